"""The tune stage: Optuna proposes values for the recipe's search space (``tune.space``), each trial is
a short Ray Train run judged by its held-out loss.

Outputs under ``<run>/tune/``: ``sweep/`` (Ray Tune's experiment), ``trials/``
(each trial's Ray Train run) and ``best.json``.
"""

from __future__ import annotations

import json
import math
import shutil
from typing import Any

from pipelines.progress import progress
from pipelines.runs import RunDir, StageResult, hash_dir
from pipelines.train.config import TrainConfig
from tune.config import TuneConfig, trial_train_config


def run_trial(params: dict[str, Any], *, train: dict[str, Any], tune_config: dict[str, Any], run_root: str, seed: int):
    """Tune trainable: one Ray Train run whose reports flow back to Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.train.trainer import build_trainer

    run = RunDir(run_root)
    config = trial_train_config(TrainConfig.model_validate(train), TuneConfig.model_validate(tune_config), params)
    trainer = build_trainer(
        config,
        run,
        seed,
        storage_path=run.stage_dir("tune") / "trials",
        name=ray.tune.get_context().get_trial_name(),
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def objective(has_val: bool) -> str:
    """Held-out loss at the trial's budget; the training loss only when the data has no held-out split."""
    return "val_loss" if has_val else "loss"


def _trial_progress_callback():
    from ray import tune

    class TrialProgress(tune.Callback):
        """Moves the stage's progress line as trials finish (Tune runs callbacks in the driver)."""

        def __init__(self, bar):
            self.bar = bar

        def __getstate__(self):
            # Tune saves its callbacks with the sweep's state; the bar (and its terminal) stay in this process.
            return {"bar": None}

        def on_trial_complete(self, iteration, trials, trial, **info):
            if self.bar is not None:
                self.bar.update()

        def on_trial_error(self, iteration, trials, trial, **info):
            if self.bar is not None:
                self.bar.update()

    return TrialProgress


def run_tune(config: TuneConfig, train: TrainConfig, run: RunDir, seed: int) -> StageResult:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from pipelines.train.trainer import data_outputs

    TrialProgress = _trial_progress_callback()
    inputs = data_outputs(run)
    out = run.begin("tune")
    for name in ("sweep", "trials"):
        shutil.rmtree(out / name, ignore_errors=True)  # an interrupted sweep starts over: trials are short
    metric = objective(inputs["val"].is_dir())
    trainable = tune.with_parameters(
        run_trial,
        train=train.model_dump(mode="json"),
        tune_config=config.model_dump(mode="json"),
        run_root=str(run.root),
        seed=seed,
    )
    bar = progress(config.num_trials, "tune", "trials")
    tuner = tune.Tuner(
        trainable,
        param_space={key: distribution.sampler() for key, distribution in config.space.items()},
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(metric=metric, mode="min", seed=seed),
            num_samples=config.num_trials,
            max_concurrent_trials=config.max_concurrent_trials,
        ),
        # Tune's own status table off: the stage's progress line says how many trials are done.
        run_config=tune.RunConfig(name="sweep", storage_path=str(out), verbose=0, callbacks=[TrialProgress(bar)]),
    )
    try:
        results = tuner.fit()
    finally:
        bar.close()
    trials = []
    for result in results:
        reported = result.metrics or {}
        trials.append(
            {
                "trial_id": reported.get("trial_id"),
                "params": {key: result.config[key] for key in config.space},
                "loss": reported.get("loss"),
                "val_loss": reported.get("val_loss"),
                "error": str(result.error) if result.error else None,
            }
        )
    finished = [t for t in trials if isinstance(t[metric], float) and math.isfinite(t[metric])]
    if not finished:
        raise RuntimeError(f"tune: no trial reported {metric}; errors: {[t['error'] for t in trials]}")
    best = min(finished, key=lambda t: t[metric])
    summary = {"metric": metric, "mode": "min", "best": best, "trials": trials}
    (out / "best.json").write_text(json.dumps(summary, indent=2) + "\n")
    return StageResult(
        inputs={"train_shards": hash_dir(inputs["train"])},
        outputs={"best": str(out / "best.json"), "sweep": str(out / "sweep")},
        metrics={"best_params": best["params"], f"best_{metric}": best[metric], "trials": len(trials)},
    )


def best_trial(run: RunDir) -> dict[str, Any]:
    """The finished sweep's best trial (``params``, ``trial_id``, losses), which the train stage trains with."""
    from pipelines.train.trainer import MissingInputError

    best = run.stage_dir("tune") / "best.json"
    if not run.is_complete("tune") or not best.is_file():
        raise MissingInputError(
            f"tune is enabled and has not completed in {run.root}: run `loom tune` first (the sweep picks the "
            "training run's values), or set tune.enabled=false to train with the recipe's own"
        )
    found = json.loads(best.read_text())["best"]
    if "params" not in found:
        raise MissingInputError(
            f"{best} was written by an earlier Loom (no params): redo the sweep with `loom tune --force`"
        )
    return found
