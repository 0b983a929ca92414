"""The tune stage: Optuna proposes values for the recipe's search space (``tune.space``), each trial is
a short Ray Train run judged by its held-out loss, or (``tune.objective``) by its exported model's score on an
eval task. ASHA stops trials at its rungs by held-out loss either way.

Outputs under ``<run>/tune/``: ``sweep/`` (Ray Tune's experiment), ``trials/`` (each trial's Ray Train
run), ``best.json`` (the best trial and every trial's values, status and stop reason) and
``trials.parquet`` (every report of every trial); for an eval objective, ``eval-tasks/`` (the task, built from
the held-out documents) and ``eval/<trial>/`` (the harness's result and sample files of each scored trial); the
plot is ``<run>/report/tune_sweep.png``. A sweep
whose driver was killed resumes where it stopped when ``loom tune`` runs it again with the same setup.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.artifacts import DataOutputs, TuneBest
from pipelines.runs import RunDir, StageResult, hash_dir
from pipelines.sweeps import (
    optuna_sampler,
    releasing_trials_placement_groups,
    resumable_sweep,
    scheduler_state_callback,
    sweep_identity,
    trial_progress_callback,
)
from pipelines.train.config import TrainConfig
from tune.config import TuneConfig, trial_of
from tune.trials import Objective, TrialRecord, finite, param_importances, plot_sweep, write_trials_table

if TYPE_CHECKING:
    from pipelines.eval.config import EvalConfig


def run_trial(
    params: dict[str, Any],
    *,
    train: dict[str, Any],
    tune_config: dict[str, Any],
    eval_config: dict[str, Any] | None,
    objective: Objective,
    run_root: str,
    seed: int,
):
    """Tune trainable: one Ray Train run whose reports flow back to Tune; then, for an eval objective, its
    exported model scored on the task, reported once more."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train.trainer import build_trainer, while_fitting

    run = RunDir(run_root)
    config = trial_of(TrainConfig.model_validate(train), TuneConfig.model_validate(tune_config), params)
    name = ray.tune.get_context().get_trial_name()
    trainer = build_trainer(
        config,
        run,
        seed,
        storage_path=run.stage_dir("tune") / "trials",
        name=name,
        callbacks=[TuneReportCallback()],
    )
    with while_fitting(config, stop_when_lost=False):
        result = trainer.fit()
    if objective.scored_by_eval:
        from pipelines.eval.config import EvalConfig

        ray.tune.report(_eval_report(result, objective, EvalConfig.model_validate(eval_config), run, name, seed))


def _eval_report(result, objective: Objective, eval_config: EvalConfig, run: RunDir, trial: str, seed: int):
    """The trial's exported model scored on the objective's task (the harness's files under
    ``tune/eval/<trial>/``), as the trial's last report: the final step, the score and its standard error."""
    from pipelines.eval.harness import harness_environment, load, score
    from pipelines.train.loop import FINAL_EXPORT_MARKER

    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial} finished without its model export; nothing to score on {objective.key}")
    out = run.stage_dir("tune") / "eval" / trial
    out.mkdir(parents=True, exist_ok=True)
    harness_environment()
    with result.checkpoint.as_directory() as model_dir:
        if not (Path(model_dir) / FINAL_EXPORT_MARKER).exists():
            raise RuntimeError(f"trial {trial}: its last checkpoint {result.checkpoint.path} is not its model export")
        model = load(model_dir, eval_config, DataOutputs.of(run).seq_len)
        scores = score(model, model_dir, [objective.task], out, seed)
    scored = scores.tasks[objective.task.name][objective.metric]
    return {
        objective.key: scored.value,
        f"{objective.key}_stderr": scored.stderr,
        "step": int(result.metrics["step"]),
        "final": True,
    }


def loss_objective(has_val: bool) -> Objective:
    """Held-out loss at the trial's budget; the training loss only when the data has no held-out split."""
    return Objective(key="val_loss" if has_val else "loss", mode="min")


def eval_objective(config: TuneConfig, eval_config: EvalConfig, data: DataOutputs, run: RunDir, seed: int) -> Objective:
    """The recipe's eval task, built here once from the held-out documents, and its metric, checked before any
    trial trains."""
    from pipelines.eval.harness import run_tasks

    wanted = config.objective
    tasks = {task.name: task for task in run_tasks(data, eval_config, run.stage_dir("tune") / "eval-tasks", seed)}
    task = tasks.get(wanted.task)
    if task is None:
        raise ValueError(
            f"tune.objective.task: the held-out documents built no task {wanted.task!r}; built: {', '.join(tasks)}"
        )
    metric = wanted.metric or task.headline
    metrics = [entry["metric"] for entry in task.config["metric_list"]]
    if metric not in metrics:
        raise ValueError(
            f"tune.objective.metric: {task.name} has no metric {metric!r}; its metrics: {', '.join(metrics)}"
        )
    return Objective(
        key=f"{task.name}.{metric}", mode="min" if task.lower_is_better else "max", task=task, metric=metric
    )


def _scheduler(config: TuneConfig, loss: str, objective: Objective):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

    class ScoredAfterItsBudget(ASHAScheduler):
        """ASHA that lets a trial at its budget go on to score its model. Stock ASHA stops it there
        (``stop_last_trials``) or, without that, compares it at a top rung equal to the budget and may stop it
        mid-export; here no rung is compared at the budget, as with ``stop_last_trials``, and nothing is stopped."""

        def on_trial_result(self, tune_controller, trial, result):
            if result.get(self._time_attr, 0) >= self._max_t:
                return TrialScheduler.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

    if config.scheduler == "fifo":
        return FIFOScheduler()
    # Rungs in optimizer steps (every report carries "step"), so the recipe's numbers mean the same
    # whatever the report interval is. Judged by the loss every report has, whatever the objective.
    return (ScoredAfterItsBudget if objective.scored_by_eval else ASHAScheduler)(
        time_attr="step",
        metric=loss,
        mode="min",
        max_t=config.max_steps_per_trial,
        grace_period=config.grace_period_steps,
        reduction_factor=config.reduction_factor,
    )


def _searcher(config: TuneConfig, objective: Objective, seed: int):
    """Optuna, told each trial's objective. For an eval objective that is one report after training: the
    reports before it carry the loss only, and Optuna is not told of them (OptunaSearch would fail on them)."""
    from ray.tune.search.optuna import OptunaSearch

    class FinalScoreSearch(OptunaSearch):
        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.metric in result:
                super().on_trial_result(trial_id, result)

    searcher = FinalScoreSearch if objective.scored_by_eval else OptunaSearch
    return searcher(
        metric=objective.key, mode=objective.mode, sampler=optuna_sampler(config.search, seed, config.startup_trials)
    )


@contextlib.contextmanager
def _metric_checks(objective: Objective) -> Iterator[None]:
    """Tune checks that every report has the searcher's metric; an eval objective's is in the last one only.
    Off while such a sweep runs (Tune reads it from the environment), restored after: later stages share
    this process."""
    name, before = "TUNE_DISABLE_STRICT_METRIC_CHECKING", os.environ.get("TUNE_DISABLE_STRICT_METRIC_CHECKING")
    if objective.scored_by_eval:
        os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _record(result, keys, objective: Objective) -> TrialRecord:
    """A Tune result as plain data: the values, every report's step and losses, the eval score, the error."""
    reports = result.metrics_dataframe
    rows = [] if reports is None else reports.to_dict("records")
    # The final report (the export's) repeats the last step; in the table other rows hold NaN under "final".
    rows = [row for row in rows if "step" in row and row.get("final") not in (True, 1)]

    def number(row, name):
        value = row.get(name)
        return float(value) if value is not None and not (isinstance(value, float) and math.isnan(value)) else None

    return TrialRecord(
        trial_id=str((result.metrics or {}).get("trial_id") or result.path.rsplit("/", 1)[-1]),
        params={key: result.config[key] for key in keys},
        steps=[int(row["step"]) for row in rows],
        loss=[number(row, "loss") for row in rows],
        val_loss=[number(row, "val_loss") for row in rows],
        error=str(result.error) if result.error else None,
        eval_score=number(result.metrics or {}, objective.key) if objective.scored_by_eval else None,
    )


def run_tune(
    config: TuneConfig, train: TrainConfig, run: RunDir, seed: int, eval_config: EvalConfig | None = None
) -> StageResult:
    from ray import tune

    data = DataOutputs.of(run)
    out = run.begin("tune")
    loss = loss_objective(data.has_val)
    if config.objective is not None:
        if eval_config is None:
            raise ValueError("tune.objective names an eval task: the sweep needs the recipe's eval section")
        objective = eval_objective(config, eval_config, data, run, seed)
    else:
        objective, eval_config = loss, None
    shards = hash_dir(data.train)
    trainable = tune.with_parameters(
        run_trial,
        train=train.model_dump(mode="json"),
        tune_config=config.model_dump(mode="json"),
        eval_config=eval_config.model_dump(mode="json") if eval_config is not None else None,
        objective=objective,
        run_root=str(run.root),
        seed=seed,
    )
    identity = _sweep_identity(config, train, seed, shards, eval_config)
    tuner = resumable_sweep(out, trainable, identity, "tune", also_clear=("trials", "eval"))
    if tuner is None:
        scheduler = _scheduler(config, loss.key, objective)
        tuner = tune.Tuner(
            trainable,
            param_space={key: distribution.sampler() for key, distribution in config.space.items()},
            tune_config=tune.TuneConfig(
                search_alg=_searcher(config, objective, seed),
                scheduler=scheduler,
                num_samples=config.num_trials,
                max_concurrent_trials=config.max_concurrent_trials,
            ),
            # Tune's own status table off: the stage's progress line says how many trials are done.
            run_config=tune.RunConfig(
                name="sweep",
                storage_path=str(out),
                verbose=0,
                callbacks=[trial_progress_callback("tune"), scheduler_state_callback(scheduler)],
            ),
        )
    with releasing_trials_placement_groups("tune"), _metric_checks(objective):
        results = tuner.fit()
    records = [_record(result, config.space, objective) for result in results]
    return _summarise(records, config, loss.key, objective, shards, run)


def _sweep_identity(
    config: TuneConfig, train: TrainConfig, seed: int, shards: str, eval_config: EvalConfig | None
) -> str:
    """What a sweep's trials depend on: an interrupted sweep is resumed only when all of it is unchanged."""
    described = {"tune": config.model_dump(mode="json"), "train": train.model_dump(mode="json"), "seed": seed}
    if eval_config is not None:  # the objective's task is built and scored as the eval section says
        described["eval"] = eval_config.model_dump(mode="json")
    return sweep_identity({**described, "train_shards": shards})


def _summarise(
    records: list[TrialRecord], config: TuneConfig, loss: str, objective: Objective, shards: str, run: RunDir
) -> StageResult:
    """best.json, trials.parquet and the sweep's plot in the run's report. The best trial is the best objective
    among the trials that trained their whole budget: a stopped trial's loss is from fewer steps, and it
    scored no model. ``loss``: the held-out (or training) loss ASHA stops trials by."""
    out = run.stage_dir("tune")
    budget = config.max_steps_per_trial
    summaries = {id(record): record.summary(budget, loss, config.scheduler, objective) for record in records}
    finished = [r for r in records if r.status(budget) == "completed" and finite(r.score(objective))]
    if not finished:
        raise RuntimeError(
            f"tune: no trial trained its budget and reported {objective.key}; trials: {list(summaries.values())}"
        )
    top = objective.best([r.score(objective) for r in finished])
    winner = summaries[id(next(r for r in finished if r.score(objective) == top))]
    best = {**winner, "objective": objective.key, "score": top}
    importances = param_importances(records, {k: d.optuna() for k, d in config.space.items()}, objective, budget)
    summary = {
        "metric": objective.key,
        "mode": objective.mode,
        "best": best,
        "importances": importances,
        "trials": list(summaries.values()),
    }
    best_path = TuneBest.write(run, summary)
    table = write_trials_table(records, out / "trials.parquet", budget, loss, config.scheduler, objective)
    plot = plot_sweep(records, importances, run.root / "report" / "tune_sweep.png", loss, budget, objective)
    outputs = {"best": str(best_path), "trials": str(table), "plot": str(plot), "sweep": str(out / "sweep")}
    if objective.scored_by_eval:
        outputs["eval"] = str(out / "eval")
    return StageResult(
        inputs={"train_shards": shards},
        outputs=outputs,
        metrics={
            "best_params": best["params"],
            f"best_{objective.key}": top,
            "trials": len(records),
            "stopped_early": sum(s["status"] == "stopped" for s in summaries.values()),
            "failed": sum(s["status"] == "error" for s in summaries.values()),
            "trial_steps": sum(record.last_step for record in records),
        },
    )
