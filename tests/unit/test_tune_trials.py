"""A sweep's trial records: status and stop reasons, the trials table, Optuna's importances and the plot."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from cluster.recipe import ConfigError, load_config
from pipelines.runs import RunDir
from tune.config import Distribution, TuneConfig
from tune.stage import _summarise
from tune.trials import Objective, TrialRecord, param_importances, plot_sweep, write_trials_table

BUDGET = 4
LOSS = Objective(key="val_loss", mode="min")
#: As the tune stage makes it for {task: loom_choice}; a task object is what marks it scored by eval.
CHOICE = Objective(key="loom_choice.acc", mode="max", task=object(), metric="acc")
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
    summaries = {r.trial_id: r.summary(BUDGET, "val_loss", "asha", LOSS) for r in records()}
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
    path = write_trials_table(records(), tmp_path / "trials.parquet", BUDGET, "val_loss", "asha", LOSS)
    rows = pq.read_table(path).to_pylist()
    assert [r["trial_id"] for r in rows] == ["a", "b", "c", "d", "e"]
    assert rows[2]["steps"] == [2, 4] and rows[2]["val_loss_curve"] == [6.7, 6.2]
    assert json.loads(rows[2]["params"]) == {"train.lr": 0.006, "train.warmup_steps": 3}
    assert [r["status"] for r in rows].count("stopped") == 1 and rows[4]["steps"] == []
    assert [r["score"] for r in rows] == [6.5, 9.1, 6.2, 6.4, None]  # judged by the last held-out loss


def test_importances_come_from_the_trials_that_trained_their_budget(tmp_path):
    space = {key: d.optuna() for key, d in SPACE.items()}
    importances = param_importances(records(), space, LOSS, BUDGET)
    assert set(importances) == set(SPACE) and abs(sum(importances.values()) - 1) < 1e-6
    assert param_importances(records()[:2], space, LOSS, BUDGET) == {}  # one finished trial: nothing to say
    plot = plot_sweep(records(), importances, tmp_path / "sweep.png", "val_loss", BUDGET, LOSS)
    assert plot.stat().st_size > 10_000


def run_dir(path) -> RunDir:
    """A run whose tune stage has begun (``run.begin`` makes its folder)."""
    (path / "tune").mkdir(parents=True)
    return RunDir(path)


def scored(records: list[TrialRecord], scores: dict[str, float]) -> list[TrialRecord]:
    """The records as a sweep judged by an eval task leaves them: the trials that trained their budget scored."""
    for record in records:
        record.eval_score = scores.get(record.trial_id)
    return records


def test_a_sweep_judged_by_an_eval_task_picks_the_best_score_not_the_lowest_loss(tmp_path):
    # c has the lowest held-out loss; a scored best on the task (higher accuracy is better).
    trials = scored(records(), {"a": 0.75, "c": 0.5, "d": 0.25})
    config = TuneConfig(space=SPACE, max_steps_per_trial=BUDGET, objective={"task": "loom_choice"})
    result = _summarise(trials, config, "val_loss", CHOICE, "shards", run_dir(tmp_path / "run"))
    best = json.loads((tmp_path / "run" / "tune" / "best.json").read_text())
    assert (best["metric"], best["mode"]) == ("loom_choice.acc", "max")
    assert best["best"]["trial_id"] == "a" and best["best"]["loom_choice.acc"] == 0.75
    assert (best["best"]["objective"], best["best"]["score"]) == ("loom_choice.acc", 0.75)  # what train records
    assert result.metrics["best_loom_choice.acc"] == 0.75
    # ASHA's stop reason is still the loss; a stopped trial has no score.
    by_id = {t["trial_id"]: t for t in best["trials"]}
    assert by_id["b"]["loom_choice.acc"] is None and "val_loss 9.1" in by_id["b"]["stop_reason"]
    rows = pq.read_table(result.outputs["trials"]).to_pylist()
    assert [r["score"] for r in rows] == [0.75, None, 0.5, 0.25, None]
    assert set(param_importances(trials, {k: d.optuna() for k, d in SPACE.items()}, CHOICE, BUDGET)) == set(SPACE)
    assert result.outputs["eval"].endswith("tune/eval")
    # Lower-is-better tasks (bits per byte) pick the lowest score.
    bits = Objective(key="loom_perplexity_stdlib.bits_per_byte", mode="min", task=object(), metric="bits_per_byte")
    _summarise(trials, config, "val_loss", bits, "shards", run_dir(tmp_path / "run2"))
    assert json.loads((tmp_path / "run2" / "tune" / "best.json").read_text())["best"]["trial_id"] == "d"


def test_no_scored_trial_is_an_error_that_names_the_objective(tmp_path):
    config = TuneConfig(space=SPACE, max_steps_per_trial=BUDGET, objective={"task": "loom_choice"})
    with pytest.raises(RuntimeError, match="no trial trained its budget and reported loom_choice.acc"):
        _summarise(scored(records(), {}), config, "val_loss", CHOICE, "shards", run_dir(tmp_path / "run"))


def test_an_eval_objective_must_be_a_task_the_recipe_builds():
    with pytest.raises(ConfigError) as raised:
        load_config(None, ["tune.objective={task: loom_choise}", "data.heldout_documents=0"])
    problems = dict(raised.value.problems)
    assert "loom_choice" in problems["tune.objective.task"]  # the tasks it could be, listed
    assert "data.heldout_documents is 0" in problems["tune.objective"]
    with pytest.raises(ConfigError, match="tune.objective.task"):
        load_config(None, ["tune.objective={task: loom_choice}", "eval.tasks=[perplexity]"])
    with pytest.raises(
        ConfigError, match="tune.objective.metric: loom_choice reports no 'acc_nrom'; its metrics: acc, acc_norm"
    ):
        load_config(None, ["tune.objective={task: loom_choice, metric: acc_nrom}"])
    config = load_config(None, ["tune.objective={task: loom_perplexity_stdlib, metric: word_perplexity}"])
    assert config.tune.objective.metric == "word_perplexity"


def test_asha_lets_a_trial_at_its_budget_go_on_to_be_scored():
    """Budget 4, rungs at 2 and 4: stock ASHA without stop_last_trials would compare the second trial at the top rung
    (step 4, the budget) and stop it, before its model is scored. Rungs below the budget still stop trials."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from tune.stage import _scheduler

    config = TuneConfig(space=SPACE, max_steps_per_trial=BUDGET, grace_period_steps=2, reduction_factor=2)
    asha = _scheduler(config, "val_loss", CHOICE)
    first, second, third = (Trial("run_trial", trial_id=f"t{i}", stub=True) for i in range(3))
    for trial in (first, second, third):
        asha.on_trial_add(None, trial)
    reports = [(first, 2, 6.0), (first, 4, 5.0), (second, 2, 5.9), (second, 4, 5.5), (third, 2, 9.0)]
    decisions = [asha.on_trial_result(None, t, {"step": step, "val_loss": loss}) for t, step, loss in reports]
    assert decisions[:4] == [TrialScheduler.CONTINUE] * 4
    assert decisions[4] == TrialScheduler.STOP  # a rung below the budget: the worse trial stopped
    # The score that ends a trial (no loss in it) is not ASHA's to judge.
    assert asha.on_trial_result(None, second, {"step": 4, "loom_choice.acc": 0.5}) == TrialScheduler.CONTINUE
