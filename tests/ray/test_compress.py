"""The compress stage on the tests' trained model: a sweep over every family CPU serving allows, measured
in the engines that would serve each candidate, a front that really is non-dominated, and a sweep whose
driver is killed resuming without measuring its finished candidates again."""

from __future__ import annotations

import json
import math

import pytest


def _dominates(a: dict, b: dict) -> bool:
    """On the ratios to the base measured in each one's own engine (what the front compares)."""
    a, b = a["ratios"], b["ratios"]
    no_worse = (
        a["perplexity"] <= b["perplexity"]
        and a["weight_bytes"] <= b["weight_bytes"]
        and a["tokens_per_s"] >= b["tokens_per_s"]
    )
    return no_worse and (
        a["perplexity"] < b["perplexity"]
        or a["weight_bytes"] < b["weight_bytes"]
        or a["tokens_per_s"] > b["tokens_per_s"]
    )


def test_every_family_is_measured_where_it_would_be_served(compress_done, tiny_config):
    run_dir = tiny_config.run_dir()
    pareto = json.loads((run_dir / "compress" / "pareto.json").read_text())
    trials = {t["recipe"]["family"]: t for t in pareto["trials"]}
    assert set(trials) == {"bnb_int8", "w8a8", "prune", "distill"}, pareto["failed"]
    assert pareto["failed"] == []
    # bitsandbytes has no vLLM CPU kernels: measured through transformers and marked as not servable here.
    assert (trials["bnb_int8"]["engine"], trials["bnb_int8"]["servable"]) == ("transformers", False)
    for family in ("w8a8", "prune", "distill"):
        assert (trials[family]["engine"], trials[family]["servable"]) == ("vllm", True)
    base = pareto["base"]
    for engine in ("vllm", "transformers"):
        assert math.isfinite(base[engine]["perplexity"]) and base[engine]["tokens_per_s"] > 0
    # The same weights score the same perplexity in both engines.
    assert base["vllm"]["perplexity"] == pytest.approx(base["transformers"]["perplexity"], rel=0.01)
    for trial in trials.values():
        assert math.isfinite(trial["perplexity"]) and trial["tokens_per_s"] > 0 and trial["p50_latency_ms"] > 0
        reference = base[trial["engine"]]
        assert trial["ratios"]["perplexity"] == pytest.approx(trial["perplexity"] / reference["perplexity"])
    # Sizes as claimed: int8 linear weights (the tied fp32 embedding stays), half the heads and channels.
    full = base["vllm"]["weight_bytes"]
    assert trials["bnb_int8"]["weight_bytes"] < 0.65 * full
    assert trials["w8a8"]["weight_bytes"] < 0.65 * full
    assert trials["prune"]["recipe"]["kv_head_groups"] == "1/2"
    assert trials["prune"]["recipe"]["mlp_channels"] == "128/256"
    assert 0.55 * full < trials["prune"]["weight_bytes"] < 0.8 * full
    # The pruned model's recovery: a fine-tune from its pruned weights against the unpruned model's logits.
    recovered = trials["prune"]["recipe"]
    assert recovered["recovered_steps"] == recovered["recovery_steps"] == 2
    assert math.isfinite(recovered["recovered_val_loss"])
    # The student: one of the two layers, trained by Ray Train + DeepSpeed against the model's logits.
    student = trials["distill"]
    assert (student["name"], student["recipe"]["layers"], student["recipe"]["hidden_size"]) == (
        "distilled-l1-h64",
        "1/2",
        "64/64",
    )
    assert 0.6 * full < student["weight_bytes"] < 0.85 * full  # the tied embedding is most of this model
    assert student["recipe"]["trained_steps"] == 4 and math.isfinite(student["recipe"]["student_val_loss"])


def test_front_is_non_dominated_and_its_variants_load(compress_done, tiny_config):
    from transformers import AutoConfig, AutoModelForCausalLM

    run_dir = tiny_config.run_dir()
    pareto = json.loads((run_dir / "compress" / "pareto.json").read_text())
    base_config = AutoConfig.from_pretrained(pareto["lineage"]["base_model"])
    everyone = [pareto["base"]["vllm"], *pareto["trials"]]
    feasible = [c for c in everyone if c["feasible"]]
    front = pareto["front"]
    assert front, pareto
    front_names = {m["name"] for m in front}
    for candidate in feasible:  # checked against every trial, not only the front
        dominated = any(_dominates(other, candidate) for other in feasible)
        assert (candidate["name"] in front_names) == (not dominated), candidate
    for candidate in everyone:
        assert candidate["feasible"] == (
            candidate["ratios"]["perplexity"] <= 1 + tiny_config.compress.max_perplexity_increase
        )
    for name in pareto["variants"]:
        variant = run_dir / "compress" / "variants" / name
        record = json.loads((variant / "compression.json").read_text())
        assert record["name"] == name and record["on_front"] and record["lineage"]["base_model_hash"]
        model = AutoModelForCausalLM.from_pretrained(variant, device_map="cpu")
        assert model.config.vocab_size == base_config.vocab_size  # the base's tokenizer, copied with it
        assert (variant / "tokenizer.json").is_file()
    for scratch in ("candidates", "students"):  # only the front is kept
        assert not (run_dir / "compress" / scratch).exists()
    assert (run_dir / "report" / "compress_pareto.png").stat().st_size > 10_000
    record = json.loads((run_dir / "manifest.json").read_text())["stages"]["compress"]
    assert record["metrics"]["trials"] == 4 and record["metrics"]["front"] == [m["name"] for m in front]


def test_the_student_is_measured_as_the_models_speculative_draft_in_vllm(compress_done, tiny_config):
    from transformers import AutoConfig

    run_dir = tiny_config.run_dir()
    pareto = json.loads((run_dir / "compress" / "pareto.json").read_text())
    student = next(t for t in pareto["trials"] if t["recipe"]["family"] == "distill")
    draft = pareto["draft"]
    assert (draft["variant"], draft["trial_id"], draft["method"]) == (
        student["name"],
        student["trial_id"],
        "draft_model",
    )
    tokens = tiny_config.compress.draft.num_speculative_tokens
    assert draft["num_speculative_tokens"] == tokens
    # vLLM's own counters: every proposed token was checked, and at most all of them were accepted.
    speed = tiny_config.compress.speed
    assert draft["draft_tokens"] >= speed.requests * speed.new_tokens / (tokens + 1)
    assert 0 <= draft["acceptance_rate"] <= 1 and 0 <= draft["mean_accepted_tokens"] <= tokens
    assert draft["ratios"]["tokens_per_s"] == pytest.approx(
        draft["tokens_per_s"] / pareto["base"]["vllm"]["tokens_per_s"]
    )
    # Kept for serving as a draft, on the front or not, with the measurement in its record.
    variant = run_dir / "compress" / "variants" / draft["variant"]
    record = json.loads((variant / "compression.json").read_text())
    assert record["speculative"] == draft and record["recipe"]["family"] == "distill"
    assert AutoConfig.from_pretrained(variant).num_hidden_layers == 1
    metrics = json.loads((run_dir / "manifest.json").read_text())["stages"]["compress"]["metrics"]
    assert metrics["draft"]["variant"] == draft["variant"]


def test_killed_sweep_driver_resumes_keeping_its_finished_candidates(compress_done, tiny_config):
    run_dir = tiny_config.run_dir()
    pareto = json.loads((run_dir / "compress" / "pareto.json").read_text())
    assert compress_done["kept_id"] in {t["trial_id"] for t in pareto["trials"]}
    assert len(pareto["trials"]) == 4 and len(list((run_dir / "compress" / "sweep").glob("run_candidate_*"))) == 4
    # The finished candidate was not measured again: Tune appended no report to it.
    assert (compress_done["kept_dir"] / "result.json").read_text() == compress_done["reports_before"]


def test_compress_is_skipped_once_complete(compress_done, tiny_config, capsys):
    from cluster.chain import run_stage

    assert run_stage("compress", tiny_config) is None
    assert "compress: already complete" in capsys.readouterr().out
