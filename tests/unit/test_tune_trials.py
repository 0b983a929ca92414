"""A sweep's trial records: status and stop reasons, the trials table, Optuna's importances and the plot."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from tune.config import Distribution
from tune.trials import TrialRecord, param_importances, plot_sweep, write_trials_table

BUDGET = 4
SPACE = {
    "train.lr": Distribution(kind="loguniform", low=1e-3, high=1e-1),
    "train.warmup_steps": Distribution(kind="int", low=0, high=4),
}


def records() -> list[TrialRecord]:
    def trial(trial_id, lr, warmup, losses, error=None):
        steps = [2 * (i + 1) for i in range(len(losses))]
        return TrialRecord(trial_id, {"train.lr": lr, "train.warmup_steps": warmup}, steps, losses, losses, error)

    return [
        trial("a", 0.003, 1, [6.8, 6.5]),
        trial("b", 0.09, 0, [9.1]),  # stopped at the first rung
        trial("c", 0.006, 3, [6.7, 6.2]),
        trial("d", 0.01, 2, [6.9, 6.4]),
        trial("e", 0.002, 4, [], error="RuntimeError('worker lost')"),
    ]


def test_status_and_stop_reason_say_how_each_trial_ended():
    summaries = {r.trial_id: r.summary(BUDGET, "val_loss", "asha") for r in records()}
    assert {k: s["status"] for k, s in summaries.items()} == {
        "a": "completed",
        "b": "stopped",
        "c": "completed",
        "d": "completed",
        "e": "error",
    }
    assert summaries["b"]["stop_reason"].startswith("stopped by ASHA at step 2 of 4: val_loss 9.1")
    assert summaries["e"]["stop_reason"] == "raised: RuntimeError('worker lost')"
    assert summaries["c"]["val_loss"] == 6.2 and summaries["e"]["val_loss"] is None


def test_trials_table_has_every_report_of_every_trial(tmp_path):
    path = write_trials_table(records(), tmp_path / "trials.parquet", BUDGET, "val_loss", "asha")
    rows = pq.read_table(path).to_pylist()
    assert [r["trial_id"] for r in rows] == ["a", "b", "c", "d", "e"]
    assert rows[2]["steps"] == [2, 4] and rows[2]["val_loss_curve"] == [6.7, 6.2]
    assert json.loads(rows[2]["params"]) == {"train.lr": 0.006, "train.warmup_steps": 3}
    assert [r["status"] for r in rows].count("stopped") == 1 and rows[4]["steps"] == []


def test_importances_come_from_the_trials_that_trained_their_budget(tmp_path):
    space = {key: d.optuna() for key, d in SPACE.items()}
    importances = param_importances(records(), space, "val_loss", BUDGET)
    assert set(importances) == set(SPACE) and abs(sum(importances.values()) - 1) < 1e-6
    assert param_importances(records()[:2], space, "val_loss", BUDGET) == {}  # one finished trial: nothing to say
    plot = plot_sweep(records(), importances, tmp_path / "sweep.png", "val_loss", BUDGET)
    assert plot.stat().st_size > 10_000
