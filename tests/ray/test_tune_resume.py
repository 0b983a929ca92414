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
    # The kept trial is a sound one: the first diverging trial of the resumed sweep is stopped at ASHA's first rung
    # (test_stages) against the kept trial's value, when no sound trial came between.
    assert trials[tune_done["kept_id"]]["params"]["train.lr"] != DIVERGING_LR, trials
    # The finished trial was not trained again: Tune appended no report to it.
    assert (tune_done["kept_dir"] / "result.json").read_text() == tune_done["reports_before"]
    sweep = tiny_config.run_dir() / "tune" / "sweep"
    # One folder per trial that reported. The killed driver may have started the next trial in the moment between
    # its last saved state and the kill: that trial's folder is left without a report, and the resumed sweep, which
    # never heard of it, proposes the trial again.
    reported = [
        d for d in sweep.glob("run_trial_*") if (d / "result.json").is_file() and (d / "result.json").read_text()
    ]
    assert len(reported) == tiny_config.tune.num_trials, sorted(d.name for d in sweep.glob("run_trial_*"))
    # ASHA's first rung as the resumed session saved it holds every trial, the kept one too, which that session
    # never ran: its rungs were restored (without, it would hold only the resumed trials).
    first_rung = asha_rungs(sweep)[tiny_config.tune.grace_period_steps]
    assert first_rung == set(trials), (first_rung, set(trials))


def asha_rungs(sweep: Path) -> dict[int, set[str]]:
    """The trials ASHA recorded at each rung (in steps), as the sweep's last session saved its scheduler
    (pipelines.sweeps.scheduler_state_callback) with Tune's callback states."""
    from ray import cloudpickle

    newest = max(sweep.glob("callback-states-*.pkl"))  # named by their session's start time
    states = cloudpickle.loads(newest.read_bytes())
    [scheduler] = [state["scheduler"] for state in states.values() if state and "scheduler" in state]
    return {int(step): set(recorded) for bracket in scheduler["_brackets"] for step, recorded in bracket._rungs}
