"""A sweep whose driver is killed resumes with `loom tune`: the trials it finished are kept, not trained again, and
ASHA keeps its rungs; a trial whose training worker is killed is retried by Ray Train and still finishes. The
failures are the package's own sweep's (``tune_done``), whose results test_stages checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.ray.conftest import DIVERGING_LR

pytestmark = pytest.mark.ray


def test_killed_sweep_driver_resumes_and_a_killed_trial_worker_is_retried(tune_done, tiny_config):
    record = tune_done["record"]
    assert tune_done["killed_worker"] is not None and tune_done["workers_started_after"], (
        "no training worker was killed, or none started after the kill"
    )
    best = json.loads(Path(record["outputs"]["best"]).read_text())
    assert len(best["trials"]) == tiny_config.tune.num_trials
    assert all(t["status"] in ("completed", "stopped") for t in best["trials"]), best["trials"]
    trials = {t["trial_id"]: t for t in best["trials"]}
    assert tune_done["kept_id"] in trials
    # The kept trial is a sound one, so a diverging trial of the resumed sweep is stopped at ASHA's first rung only
    # if the rung the kept trial reached before the kill was restored (test_stages checks it was stopped).
    assert trials[tune_done["kept_id"]]["params"]["train.lr"] != DIVERGING_LR, trials
    # The finished trial was not trained again: Tune appended no report to it.
    assert (tune_done["kept_dir"] / "result.json").read_text() == tune_done["reports_before"]
    sweep = tiny_config.run_dir() / "tune" / "sweep"
    assert len(list(sweep.glob("run_trial_*"))) == tiny_config.tune.num_trials
