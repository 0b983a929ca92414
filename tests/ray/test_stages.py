"""Each stage on a local Ray cluster, on tiny inputs, in chain order."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cluster.chain import StageConfigChangedError, run_stage
from pipelines.runs import RunDir
from tests.helpers import wait_released

pytestmark = pytest.mark.ray


def test_data_stage_writes_packed_shards_tokenizer_rejects_and_stats(data_done, tiny_config):
    run = RunDir(tiny_config.run_dir())
    out = run.stage_dir("data")
    stats = json.loads((out / "stats.json").read_text())
    # 120 stdlib documents + 7 jsonl lines + 2 gzip-compressed jsonl lines + 2 text files were read.
    assert stats["documents_in"] == 131
    drops = stats["drops_by_step"]
    assert drops["exact_dedup"] >= 1 and drops["length"] >= 1 and drops["read"] == 5
    assert stats["tokens_by_source"]["gz"] > 0
    assert [row["step"] for row in stats["funnel"]] == ["read"] + [s.type for s in tiny_config.data.steps]
    assert stats["funnel"][-1]["kept"] == stats["documents_out"]
    assert stats["documents_out"] == stats["documents_in"] - sum(drops.values())

    rejects = pq.read_table(out / "rejects").to_pylist()
    reasons = [r["reject_reason"] for r in rejects]
    assert any(r.startswith("read: invalid utf-8") for r in reasons)
    assert any(r == "read: missing text field 'text'" for r in reasons)
    assert any(r.startswith("read: malformed json") for r in reasons)
    assert any(r == "read: a json line must be an object, got list" for r in reasons)
    assert sum(r.startswith("read: invalid utf-8") for r in reasons) == 2
    assert sum(r.startswith("exact_dedup: duplicate (of ") for r in reasons) >= 1
    assert any(r["reject_reason"].startswith("length: too_short") and r["text"] == "too short" for r in rejects)
    assert len(rejects) == sum(drops.values())

    train = pq.read_table(out / "train").column("input_ids").to_pylist()
    assert len(train) == stats["sequences"]["train"] > 0
    assert {len(row) for row in train} == {tiny_config.data.seq_len}
    from pipelines.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(out / "tokenizer")
    assert len(tokenizer) == tiny_config.data.vocab_size
    assert tokenizer.chat_template and tokenizer.eos_token_id in {t for row in train for t in row}
    assert max(t for row in train for t in row) < len(tokenizer)
    assert data_done["metrics"]["tokens"] == stats["tokens"]


def test_data_stage_is_skipped_when_complete_and_refuses_a_changed_config(data_done, tiny_config):
    assert run_stage("data", tiny_config) is None
    changed = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"seq_len": 64})})
    with pytest.raises(StageConfigChangedError, match="--force"):
        run_stage("data", changed)


def test_train_stage_loss_falls_and_exports_a_loadable_model(train_done, tiny_config):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics = train_done["metrics"]
    assert metrics["step"] == tiny_config.train.max_steps
    # Trained with the sweep's winner, recorded with the trial it came from.
    best = json.loads((tiny_config.run_dir() / "tune" / "best.json").read_text())["best"]
    assert metrics["tuned"] == {k: best[k] for k in ("params", "trial_id", "val_loss", "objective", "score")}
    assert best["trial_id"] and train_done["read"]["tune.best"]  # the winner is part of train's key
    history = [json.loads(line) for line in Path(train_done["outputs"]["metrics"]).read_text().splitlines()]
    assert max(row["lr"] for row in history if "lr" in row) == pytest.approx(best["params"]["train.lr"], rel=0.05)
    assert metrics["last_loss"] < metrics["first_loss"]
    run = RunDir(tiny_config.run_dir())
    model_dir = Path(train_done["outputs"]["model"])
    assert (model_dir / "model.safetensors").is_file()
    assert Path(train_done["outputs"]["loss_plot"]).stat().st_size > 0
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer("def f(x):", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    # Ray Train kept DeepSpeed checkpoints (ZeRO shards of both ranks) next to the export.
    shards = list((run.stage_dir("train") / "ray").rglob("zero_pp_rank_*_optim_states.pt"))
    assert {p.name.split("_")[3] for p in shards} >= {"0", "1"}
    manifest = run.manifest()
    assert manifest["stages"]["train"]["inputs"]["train_shards"]
    # Metrics of every report: held-out loss every eval_every steps, gradient norm, memory.
    rows = [json.loads(line) for line in (run.stage_dir("train") / "metrics.jsonl").read_text().splitlines()]
    evaluated = [row["step"] for row in rows if "val_loss" in row and not row.get("final")]
    assert evaluated == list(
        range(tiny_config.train.eval_every, tiny_config.train.max_steps + 1, tiny_config.train.eval_every)
    )
    assert all(row["grad_norm"] > 0 and row["memory_mib"] > 0 for row in rows if not row.get("final"))
    assert metrics["val_perplexity"] > 1


def test_tune_stage_runs_optuna_trials_and_asha_stops_the_diverging_ones(
    tune_done, tiny_config, stage_placement_groups
):
    import pyarrow.parquet as pq

    from tests.ray.conftest import DIVERGING_LR

    record = tune_done["record"]
    best = json.loads(Path(record["outputs"]["best"]).read_text())
    trials = best["trials"]
    assert len(trials) == tiny_config.tune.num_trials
    assert all(t["params"]["train.lr"] in tiny_config.tune.space["train.lr"].values for t in trials)
    assert best["best"]["params"] == record["metrics"]["best_params"]
    # Held-out loss at every report of every trial (what ASHA stops by).
    assert all(isinstance(t["val_loss"], float) and t["val_loss"] > 0 for t in trials)
    # Judged by the recipe's eval task: every trial that trained its budget had its model scored by the harness,
    # whose own result file for the trial holds the score; the best is the highest (accuracy: higher is better).
    key = "loom_choice.acc_norm"
    assert (best["metric"], best["mode"]) == (key, "max")
    completed = [t for t in trials if t["status"] == "completed"]
    for trial in completed:
        [harness] = (tiny_config.run_dir() / "tune" / "eval").glob(f"*{trial['trial_id']}*/**/results_*.json")
        assert json.loads(harness.read_text())["results"]["loom_choice"]["acc_norm,none"] == trial[key], trial
    assert best["best"][key] == best["best"]["score"] == max(t[key] for t in completed)
    assert best["best"]["objective"] == key and record["metrics"][f"best_{key}"] == best["best"]["score"]
    assert all(t[key] is None for t in trials if t["status"] == "stopped")
    assert best["best"]["params"]["train.lr"] != DIVERGING_LR
    # The planted diverging rate: once a sound trial has reached ASHA's first rung (step 2), a diverging
    # trial that reaches it later is stopped there, with the reason recorded.
    budget, rung = tiny_config.tune.max_steps_per_trial, tiny_config.tune.grace_period_steps
    first_sound = next(i for i, t in enumerate(trials) if t["params"]["train.lr"] != DIVERGING_LR)
    late_diverging = [t for t in trials[first_sound + 1 :] if t["params"]["train.lr"] == DIVERGING_LR]
    assert late_diverging, f"the seeded sweep drew no diverging trial after a sound one: {trials}"
    for trial in late_diverging:
        assert trial["status"] == "stopped" and trial["last_step"] == rung < budget, trial
        assert trial["stop_reason"].startswith(f"stopped by ASHA at step {rung} of {budget}"), trial
    assert record["metrics"]["stopped_early"] == sum(t["status"] == "stopped" for t in trials) >= 1
    # Every report of every trial, for people: the table and the plot.
    table = pq.read_table(record["outputs"]["trials"]).to_pylist()
    assert [(row["trial_id"], row["status"]) for row in table] == [(t["trial_id"], t["status"]) for t in trials]
    for row, trial in zip(table, trials, strict=True):
        assert row["steps"][-1] == trial["last_step"] and row["val_loss_curve"][-1] == trial["val_loss"]
        assert json.loads(row["params"]) == trial["params"]
    assert record["metrics"]["trial_steps"] == sum(row["steps"][-1] for row in table) < budget * len(trials)
    assert Path(record["outputs"]["plot"]).stat().st_size > 0
    # Every trial gave its CPUs back, the stopped ones too (Tune kills a stopped trial's training controller;
    # Ray Train's cleaner, which asks the State API, then removes its workers' placement group): each placement
    # group the sweep created is removed, whatever else runs on the machine.
    wait_released(stage_placement_groups["tune"], "the sweep's placement groups to be removed")
