"""kill -9 on a training worker: the group restarts from the last checkpoint at the same data
position, and every step after the resume has the loss of an uninterrupted run."""

from __future__ import annotations

import pytest

from tests.training import RESUME_CHECKPOINT_EVERY, RESUME_STEPS, fit, killer, reported_steps

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
