"""kill -9 on a training worker: the group restarts from the last checkpoint at the same data
position, and every step after the resume has the loss of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import time

import pytest

from pipelines.train.config import TrainConfig
from tests.training import fit, reported_steps, train_worker_pids

pytestmark = pytest.mark.ray
STEPS, CHECKPOINT_EVERY, KILL_AFTER = 12, 4, 6


def test_killed_worker_resumes_exactly(data_done, tiny_config, tmp_path):
    from pipelines.train.stage import read_loss_curve

    config = TrainConfig.model_validate(
        {
            **tiny_config.train.model_dump(),
            "max_steps": STEPS,
            "warmup_steps": 2,
            "log_every": 1,
            "checkpoint_every": CHECKPOINT_EVERY,
            "max_failures": 2,
        }
    )
    reference, reference_history = fit(config, tiny_config, tmp_path, "uninterrupted")
    assert reference.error is None

    killed: dict[str, float] = {}

    def kill_one_worker(history, stop):
        while not stop.is_set():
            if max(reported_steps(history), default=0) >= KILL_AFTER:
                pids = train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed["pid"], killed["step"] = pids[-1], max(reported_steps(history))
                    return
            time.sleep(0.05)

    result, history = fit(config, tiny_config, tmp_path, "killed", during=kill_one_worker)
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
