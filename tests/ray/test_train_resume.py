"""kill -9 on a training worker: the group restarts from the last checkpoint at the same data
position, and every step after the resume has the loss of an uninterrupted run."""

from __future__ import annotations

import json

import pytest

from tests.training import RESIZE_TOLERANCE, RESUME_CHECKPOINT_EVERY, RESUME_STEPS, fit, killer, reported_steps

pytestmark = pytest.mark.ray
STEPS, CHECKPOINT_EVERY, KILL_AFTER = RESUME_STEPS, RESUME_CHECKPOINT_EVERY, 6


def test_killed_worker_resumes_exactly(uninterrupted, tiny_config, tmp_path):
    from pipelines.train.stage import read_loss_curve

    config, reference, reference_history = uninterrupted
    assert reference.error is None and config.max_steps == STEPS

    killed: dict[str, float] = {}
    result, history = fit(config, tiny_config, tmp_path, "killed", during=killer(KILL_AFTER, killed))
    assert killed, "no training worker was found to kill"
    assert result.error is None and result.metrics["step"] == STEPS

    steps = reported_steps(history)
    # Resumed from the checkpoint at step 4: the steps after it were reported again, none skipped.
    assert steps.count(CHECKPOINT_EVERY + 1) == 2 and max(steps) == STEPS
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    expected = read_loss_curve(reference_history)
    resumed = read_loss_curve(history)
    assert [p["step"] for p in resumed] == [p["step"] for p in expected] == list(range(1, STEPS + 1))
    for want, got in zip(expected, resumed, strict=True):
        assert abs(want["loss"] - got["loss"]) <= 1e-5, (want, got)


def test_a_run_resized_to_one_worker_trains_every_row_once_with_the_same_losses(uninterrupted, tiny_config, tmp_path):
    """Two workers killed after step 6 (no restarts allowed), then the same run on one worker: it loads the
    step-4 checkpoint through DeepSpeed's universal checkpoint, accumulates two micro-batches per step for the
    same global batch, and trains exactly the rows the two-worker run trained, step for step."""
    import ray.train

    from pipelines.train.config import TrainConfig
    from pipelines.train.ledger import read_ledger
    from pipelines.train.stage import read_loss_curve
    from pipelines.train.trainer import ledger_path

    config, _, reference_history = uninterrupted
    assert config.num_workers == 2 and config.zero_stage == 2 and config.sample_ledger
    killed: dict[str, float] = {}
    two = TrainConfig.model_validate({**config.model_dump(), "max_failures": 0})
    with pytest.raises(ray.train.WorkerGroupError):
        fit(two, tiny_config, tmp_path, "resized", during=killer(KILL_AFTER, killed))
    assert killed
    # The same global batch on one worker (another batch is refused: its data position would mean other rows).
    one = TrainConfig.model_validate({**config.model_dump(), "num_workers": 1, "gradient_accumulation_steps": 2})
    result, history = fit(one, tiny_config, tmp_path, "resized")
    assert result.error is None and result.metrics["step"] == STEPS

    rows = [json.loads(line) for line in history.read_text().splitlines()]
    resumed = [row for row in rows if row.get("world_size") == 1]
    assert resumed[0]["step"] == CHECKPOINT_EVERY + 1 and resumed[0]["grad_accum"] == 2, resumed[0]
    assert resumed[0]["restart_reshard_s"] > 0 and resumed[0]["restart_load_s"] > 0, resumed[0]
    assert {row["world_size"] for row in rows if "world_size" in row} == {1, 2}

    expected = {p["step"]: p["loss"] for p in read_loss_curve(reference_history)}
    got = {p["step"]: p["loss"] for p in read_loss_curve(history)}
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    drift = {step: abs(got[step] - expected[step]) for step in expected}
    assert all(drift[step] <= 1e-5 for step in range(1, CHECKPOINT_EVERY + 1)), drift  # before the resize: same run
    assert max(drift.values()) <= RESIZE_TOLERANCE, drift
    print(f"largest loss difference after the resize: {max(drift.values()):.2e}")

    # The sample ledger: the same micro-batches (index in the epoch and token hash) in the same steps, each once.
    resized = read_ledger(ledger_path(tmp_path, "resized"))
    assert {r["world"] for r in resized if r["step"] <= CHECKPOINT_EVERY} == {2}
    assert {r["world"] for r in resized if r["step"] > CHECKPOINT_EVERY} == {1}
    mine = sorted((r["step"], r["epoch"], r["index"], r["hash"]) for r in resized)
    positions = [(epoch, index) for _, epoch, index, _ in mine]
    assert (
        len(positions) == len(set(positions)) == STEPS * config.effective_global_batch_size // config.micro_batch_size
    )
    reference_ledger = ledger_path(reference_history.parent, "uninterrupted")
    assert mine == sorted((r["step"], r["epoch"], r["index"], r["hash"]) for r in read_ledger(reference_ledger))
