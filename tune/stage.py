"""The tune stage: Optuna proposes values for the recipe's search space (``tune.space``), each trial is
a short Ray Train run judged by its held-out loss.

Outputs under ``<run>/tune/``: ``sweep/`` (Ray Tune's experiment), ``trials/`` (each trial's Ray Train
run), ``best.json`` (the best trial and every trial's values, status and stop reason) and
``trials.parquet`` (every report of every trial); the plot is ``<run>/report/tune_sweep.png``. A sweep
whose driver was killed resumes where it stopped when ``loom tune`` runs it again with the same setup.
"""

from __future__ import annotations

import math
from typing import Any

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
from tune.trials import TrialRecord, finite, param_importances, plot_sweep, write_trials_table


def run_trial(params: dict[str, Any], *, train: dict[str, Any], tune_config: dict[str, Any], run_root: str, seed: int):
    """Tune trainable: one Ray Train run whose reports flow back to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train.trainer import build_trainer, while_fitting

    run = RunDir(run_root)
    config = trial_of(TrainConfig.model_validate(train), TuneConfig.model_validate(tune_config), params)
    trainer = build_trainer(
        config,
        run,
        seed,
        storage_path=run.stage_dir("tune") / "trials",
        name=ray.tune.get_context().get_trial_name(),
        callbacks=[TuneReportCallback()],
    )
    with while_fitting(config, stop_when_lost=False):
        trainer.fit()


def objective(has_val: bool) -> str:
    """Held-out loss at the trial's budget; the training loss only when the data has no held-out split."""
    return "val_loss" if has_val else "loss"


def _scheduler(config: TuneConfig, metric: str):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if config.scheduler == "fifo":
        return FIFOScheduler()
    # Rungs in optimizer steps (every report carries "step"), so the recipe's numbers mean the same
    # whatever the report interval is.
    return ASHAScheduler(
        time_attr="step",
        metric=metric,
        mode="min",
        max_t=config.max_steps_per_trial,
        grace_period=config.grace_period_steps,
        reduction_factor=config.reduction_factor,
    )


def _record(result, keys) -> TrialRecord:
    """A Tune result as plain data: the values, every report's step and losses, the error."""
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
    )


def run_tune(config: TuneConfig, train: TrainConfig, run: RunDir, seed: int) -> StageResult:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    data = DataOutputs.of(run)
    out = run.begin("tune")
    metric = objective(data.has_val)
    shards = hash_dir(data.train)
    trainable = tune.with_parameters(
        run_trial,
        train=train.model_dump(mode="json"),
        tune_config=config.model_dump(mode="json"),
        run_root=str(run.root),
        seed=seed,
    )
    tuner = resumable_sweep(
        out, trainable, _sweep_identity(config, train, seed, shards), "tune", also_clear=("trials",)
    )
    if tuner is None:
        scheduler = _scheduler(config, metric)
        tuner = tune.Tuner(
            trainable,
            param_space={key: distribution.sampler() for key, distribution in config.space.items()},
            tune_config=tune.TuneConfig(
                search_alg=OptunaSearch(
                    metric=metric, mode="min", sampler=optuna_sampler(config.search, seed, config.startup_trials)
                ),
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
    with releasing_trials_placement_groups("tune"):
        results = tuner.fit()
    return _summarise([_record(result, config.space) for result in results], config, metric, shards, run)


def _sweep_identity(config: TuneConfig, train: TrainConfig, seed: int, shards: str) -> str:
    """What a sweep's trials depend on: an interrupted sweep is resumed only when all of it is unchanged."""
    described = {"tune": config.model_dump(mode="json"), "train": train.model_dump(mode="json"), "seed": seed}
    return sweep_identity({**described, "train_shards": shards})


def _summarise(records: list[TrialRecord], config: TuneConfig, metric: str, shards: str, run: RunDir) -> StageResult:
    """best.json, trials.parquet and the sweep's plot in the run's report. The best trial is the lowest
    objective among the trials that trained their whole budget: a stopped trial's loss is from fewer steps."""
    out = run.stage_dir("tune")
    budget = config.max_steps_per_trial
    trials = [record.summary(budget, metric, config.scheduler) for record in records]
    finished = [t for t in trials if t["status"] == "completed" and finite(t[metric])]
    if not finished:
        raise RuntimeError(f"tune: no trial trained its budget and reported {metric}; trials: {trials}")
    best = min(finished, key=lambda t: t[metric])
    importances = param_importances(records, {k: d.optuna() for k, d in config.space.items()}, metric, budget)
    summary = {"metric": metric, "mode": "min", "best": best, "importances": importances, "trials": trials}
    best_path = TuneBest.write(run, summary)
    table = write_trials_table(records, out / "trials.parquet", budget, metric, config.scheduler)
    plot = plot_sweep(records, importances, run.root / "report" / "tune_sweep.png", metric, budget)
    return StageResult(
        inputs={"train_shards": shards},
        outputs={"best": str(best_path), "trials": str(table), "plot": str(plot), "sweep": str(out / "sweep")},
        metrics={
            "best_params": best["params"],
            f"best_{metric}": best[metric],
            "trials": len(trials),
            "stopped_early": sum(t["status"] == "stopped" for t in trials),
            "failed": sum(t["status"] == "error" for t in trials),
            "trial_steps": sum(record.last_step for record in records),
        },
    )
