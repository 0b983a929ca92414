"""The compress stage on the tests' trained model: a sweep over every family CPU serving allows, measured
in the engines that would serve each candidate, a front that really is non-dominated, and a sweep whose
driver is killed resuming without measuring its finished candidates again."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.helpers import finished_trials, wait_for

#: One candidate of each kind, so three trials cover them all: a family vLLM on CPU cannot serve
#: (measured in transformers), one it serves, and pruning.
TRY_FIRST = [
    {"family": "bnb_int8"},
    {"family": "w8a8"},
    {"family": "prune", "heads_kept": 0.5, "mlp_kept": 0.5, "then_quantize": "none"},
]


@pytest.fixture(scope="module")
def compress_config(tiny_config):
    from tune.compress.config import CompressConfig

    compress = CompressConfig.model_validate(
        {
            "enabled": True,
            "families": ["bnb_int8", "w8a8", "prune"],
            "num_trials": 3,
            "try_first": TRY_FIRST,
            # A random model of the tests' size: any compression moves perplexity by well under this.
            "max_perplexity_increase": 0.05,
            "eval_rows": 8,
            "calibration_rows": 4,
            "speed": {"requests": 3, "prompt_tokens": 8, "new_tokens": 8},
        }
    )
    return tiny_config.model_copy(update={"compress": compress})


def _probes() -> list[str]:
    found = subprocess.run(["pgrep", "-f", "pipelines.compress.probe"], capture_output=True, text=True)
    return found.stdout.split()


@pytest.fixture(scope="module")
def compress_done(train_done, compress_config, tmp_path_factory):
    """The sweep as a user meets an interruption: ``python -m tune.compress`` killed once Tune's saved state
    records a finished candidate, then the stage run again, which resumes the sweep."""
    import ray

    from cluster.chain import run_stage

    scratch = tmp_path_factory.mktemp("compress-driver")
    recipe = scratch / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(compress_config.model_dump(mode="json", exclude_none=True)))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # the driver joins this cluster
    sweep = compress_config.run_dir() / "compress" / "sweep"
    with (scratch / "driver.log").open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "tune.compress", str(recipe)], cwd=REPO_ROOT, env=env, stdout=log, stderr=log
        )
        deadline = time.monotonic() + 600
        while not finished_trials(sweep) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    kept = finished_trials(sweep)
    assert driver.returncode == -signal.SIGKILL and len(kept) == 1, ((scratch / "driver.log").read_text()[-3000:], kept)
    ((kept_id, kept_dir),) = kept.items()
    reports_before = (kept_dir / "result.json").read_text()
    # Ray kills a dead driver's trials; the engine a trial was measuring with must go with it.
    wait_for(lambda: not _probes(), 120, "the killed sweep's vLLM measurement to end")
    record = run_stage("compress", compress_config)
    return {"record": record, "kept_id": kept_id, "kept_dir": kept_dir, "reports_before": reports_before}


def _dominates(a: dict, b: dict) -> bool:
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


def test_every_family_is_measured_where_it_would_be_served(compress_done, compress_config):
    run_dir = compress_config.run_dir()
    pareto = json.loads((run_dir / "compress" / "pareto.json").read_text())
    trials = {t["recipe"]["family"]: t for t in pareto["trials"]}
    assert set(trials) == {"bnb_int8", "w8a8", "prune"}, pareto["failed"]
    assert pareto["failed"] == []
    # bitsandbytes has no vLLM CPU kernels: measured through transformers and marked as not servable here.
    assert (trials["bnb_int8"]["engine"], trials["bnb_int8"]["servable"]) == ("transformers", False)
    for family in ("w8a8", "prune"):
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


def test_front_is_non_dominated_and_its_variants_load(compress_done, compress_config):
    from transformers import AutoConfig, AutoModelForCausalLM

    run_dir = compress_config.run_dir()
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
            candidate["ratios"]["perplexity"] <= 1 + compress_config.compress.max_perplexity_increase
        )
    for name in pareto["variants"]:
        variant = run_dir / "compress" / "variants" / name
        record = json.loads((variant / "compression.json").read_text())
        assert record["name"] == name and record["on_front"] and record["lineage"]["base_model_hash"]
        model = AutoModelForCausalLM.from_pretrained(variant, device_map="cpu")
        assert model.config.vocab_size == base_config.vocab_size  # the base's tokenizer, copied with it
        assert (variant / "tokenizer.json").is_file()
    assert not (run_dir / "compress" / "candidates").exists()  # only the front is kept
    assert (run_dir / "report" / "compress_pareto.png").stat().st_size > 10_000
    record = json.loads((run_dir / "manifest.json").read_text())["stages"]["compress"]
    assert record["metrics"]["trials"] == 3 and record["metrics"]["front"] == [m["name"] for m in front]


def test_killed_sweep_driver_resumes_keeping_its_finished_candidates(compress_done, compress_config):
    run_dir = compress_config.run_dir()
    pareto = json.loads((run_dir / "compress" / "pareto.json").read_text())
    assert compress_done["kept_id"] in {t["trial_id"] for t in pareto["trials"]}
    assert len(pareto["trials"]) == 3 and len(list((run_dir / "compress" / "sweep").glob("run_candidate_*"))) == 3
    # The finished candidate was not measured again: Tune appended no report to it.
    assert (compress_done["kept_dir"] / "result.json").read_text() == compress_done["reports_before"]


def test_compress_is_skipped_once_complete(compress_done, compress_config, capsys):
    from cluster.chain import run_stage

    assert run_stage("compress", compress_config) is None
    assert "compress: already complete" in capsys.readouterr().out
