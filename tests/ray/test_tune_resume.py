"""A sweep whose driver is killed resumes with `loom tune`: the trials it finished are kept, not trained again;
a trial whose training worker is killed is retried by Ray Train and still finishes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.helpers import kill_after_first_finished_trial
from tests.training import start_from_data_stage, train_worker_pids

pytestmark = pytest.mark.ray


def test_killed_sweep_driver_resumes_and_a_killed_trial_worker_is_retried(data_done, tiny_config, tmp_path):
    import ray

    raw = tiny_config.model_dump()
    raw["run_name"] = "tune-resume"
    raw["tune"].update(
        num_trials=2,
        max_steps_per_trial=2,
        scheduler="fifo",
        space={"train.lr": {"kind": "choice", "values": [3e-3, 4e-3]}},
    )
    config = type(tiny_config).model_validate(raw)
    # Its own run on the tests' packed data (copied: a sweep reads its own run's data stage).
    run_dir = config.run_dir()
    start_from_data_stage(tiny_config.run_dir(), run_dir)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    # The CLI's drivers join this test's cluster, as `loom tune` joins a running cluster.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "cluster", "tune", str(recipe)]
    sweep = run_dir / "tune" / "sweep"

    kept = kill_after_first_finished_trial(command, sweep, tmp_path / "first.log", 300, cwd=REPO_ROOT, env=env)
    ((kept_id, kept_dir),) = kept.items()
    reports_before = (kept_dir / "result.json").read_text()

    # The killed driver's trial goes down with it (Ray fate-shares a driver's actors); wait for that, so the
    # worker killed below is surely one of the resumed sweep's.
    deadline = time.monotonic() + 120
    while train_worker_pids() and time.monotonic() < deadline:
        time.sleep(1)
    assert not train_worker_pids(), "the killed driver's training workers outlived it"

    with (tmp_path / "second.log").open("w") as log:
        driver = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        killed, started_after = None, set()
        while driver.poll() is None:  # the resumed trial's first worker is killed: Ray Train must retry it
            pids = set(train_worker_pids())
            if killed is None and pids:
                killed = min(pids)
                os.kill(killed, signal.SIGKILL)
            elif killed is not None:
                started_after |= pids - {killed}
            time.sleep(0.2)
    output = (tmp_path / "second.log").read_text()
    assert driver.returncode == 0, output[-4000:]
    assert "resuming the interrupted sweep" in output
    assert killed is not None and started_after, "no training worker was killed, or none started after the kill"
    best = json.loads((run_dir / "tune" / "best.json").read_text())
    assert [t["status"] for t in best["trials"]] == ["completed", "completed"]
    assert kept_id in {t["trial_id"] for t in best["trials"]}
    # The finished trial was not trained again: Tune appended no report to it.
    assert (kept_dir / "result.json").read_text() == reports_before
    assert len(list(sweep.glob("run_trial_*"))) == 2
