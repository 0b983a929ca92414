"""What a finished sweep leaves for people: one row per trial (``trials.parquet``) and the sweep's plots.

Kept apart from the stage so it reads plain data (no Ray objects): the stage turns Tune's results into
``TrialRecord``s, this module tabulates and draws them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from pipelines.eval.tasks import Task

Status = Literal["completed", "stopped", "error"]


@dataclass(frozen=True)
class Objective:
    """What judges a trial: the key of its result that holds the figure, and which way is better. ``task``: the
    eval task each trial that trains its budget is scored on (None: the held-out loss every report carries)."""

    key: str
    mode: Literal["min", "max"]
    task: Task | None = None
    metric: str | None = None

    @property
    def scored_by_eval(self) -> bool:
        return self.task is not None

    def best(self, values: list[float]) -> float:
        return min(values) if self.mode == "min" else max(values)


@dataclass
class TrialRecord:
    """One trial: its values, every report's step and losses, and how it ended."""

    trial_id: str
    params: dict[str, Any]
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    val_loss: list[float | None] = field(default_factory=list)
    error: str | None = None
    #: The eval objective's score of the trial's model (None: not scored, or the sweep is judged by loss).
    eval_score: float | None = None

    @property
    def last_step(self) -> int:
        return self.steps[-1] if self.steps else 0

    def last(self, metric: str) -> float | None:
        values = [v for v in (self.val_loss if metric == "val_loss" else self.loss) if v is not None]
        return values[-1] if values else None

    def score(self, objective: Objective) -> float | None:
        """The figure the trial is judged by: its eval score, or its last loss."""
        return self.eval_score if objective.scored_by_eval else self.last(objective.key)

    def status(self, budget: int) -> Status:
        if self.error is not None:
            return "error"
        return "completed" if self.last_step >= budget else "stopped"

    def stop_reason(self, budget: int, metric: str, scheduler: str) -> str:
        status = self.status(budget)
        if status == "error":
            return f"raised: {self.error}"
        if status == "completed":
            return f"trained its budget of {budget} steps"
        return (
            f"stopped by {scheduler.upper()} at step {self.last_step} of {budget}: {metric} {self.last(metric)} "
            "was not among the best at that rung"
        )

    def summary(self, budget: int, metric: str, scheduler: str, objective: Objective) -> dict[str, Any]:
        """The trial as best.json lists it: values, last losses (and eval score), status and why it ended.
        ``metric``: the loss ASHA judged it by."""
        return {
            "trial_id": self.trial_id,
            "params": self.params,
            "loss": self.last("loss"),
            "val_loss": self.last("val_loss"),
            **({objective.key: self.eval_score} if objective.scored_by_eval else {}),
            "last_step": self.last_step,
            "status": self.status(budget),
            "stop_reason": self.stop_reason(budget, metric, scheduler),
            "error": self.error,
        }


def finite(value: float | None) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def write_trials_table(
    records: list[TrialRecord], path: Path, budget: int, metric: str, scheduler: str, objective: Objective
) -> Path:
    """``trials.parquet``: every trial with its values (a JSON object: keys are dotted and values of mixed
    types), each report's step and losses, the figure it is judged by (``score``), its status and stop reason."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kept = ("trial_id", "status", "stop_reason", "last_step", "val_loss", "error")
    rows = [
        {
            **{k: v for k, v in record.summary(budget, metric, scheduler, objective).items() if k in kept},
            "params": json.dumps(record.params, sort_keys=True),
            "score": record.score(objective),
            "final_loss": record.last("loss"),
            "steps": record.steps,
            "loss_curve": record.loss,
            "val_loss_curve": record.val_loss,
        }
        for record in records
    ]
    schema = pa.schema(
        [
            ("trial_id", pa.string()),
            ("params", pa.string()),
            ("status", pa.string()),
            ("stop_reason", pa.string()),
            ("last_step", pa.int64()),
            ("final_loss", pa.float64()),
            ("val_loss", pa.float64()),
            ("score", pa.float64()),
            ("error", pa.string()),
            ("steps", pa.list_(pa.int64())),
            ("loss_curve", pa.list_(pa.float64())),
            ("val_loss_curve", pa.list_(pa.float64())),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def param_importances(
    records: list[TrialRecord], space: dict[str, Any], objective: Objective, budget: int
) -> dict[str, float]:
    """Optuna's fANOVA importances for the objective, over the trials that trained their budget (empty below two
    of them). ``space`` maps each key to its Optuna distribution."""
    import optuna

    done = [r for r in records if r.status(budget) == "completed" and finite(r.score(objective))]
    if len(done) < 2:
        return {}
    study = optuna.create_study(direction="minimize" if objective.mode == "min" else "maximize")
    for record in done:
        study.add_trial(
            optuna.trial.create_trial(params=record.params, distributions=space, value=record.score(objective))
        )
    try:
        return {key: float(value) for key, value in optuna.importance.get_param_importances(study).items()}
    except (RuntimeError, ValueError):  # e.g. every trial drew the same value: nothing to attribute
        return {}


def plot_sweep(
    records: list[TrialRecord],
    importances: dict[str, float],
    path: Path,
    metric: str,
    budget: int,
    objective: Objective,
) -> Path:
    """Three panels: each trial's ``metric`` curve (early-stopped ones dashed, ending in a cross), the optimisation
    history (each trial's objective and the best so far, in trial order) and the parameter importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, history, weights) = plt.subplots(1, 3, figsize=(15, 3.8))
    for record in records:
        values = record.val_loss if metric == "val_loss" else record.loss
        points = [(s, v) for s, v in zip(record.steps, values, strict=True) if finite(v)]
        if not points:
            continue
        stopped = record.status(budget) == "stopped"
        (line,) = curves.plot(
            [s for s, _ in points],
            [v for _, v in points],
            linestyle="--" if stopped else "-",
            marker=".",
            label=record.trial_id,
        )
        if stopped:
            curves.plot(*points[-1], marker="x", markersize=10, color=line.get_color())
    curves.set(xlabel="optimizer step", ylabel=metric, title="trials (dashed, x: stopped early)")
    curves.grid(alpha=0.3)
    if len(records) <= 12:
        curves.legend(fontsize="small")
    results = [(i, r.score(objective)) for i, r in enumerate(records, 1) if r.status(budget) == "completed"]
    results = [(i, v) for i, v in results if finite(v)]
    if results:
        history.scatter([i for i, _ in results], [v for _, v in results], label="trial's result")
        best = [objective.best([v for _, v in results[: n + 1]]) for n in range(len(results))]
        history.step([i for i, _ in results], best, where="post", color="C1", label="best so far")
    # A stopped trial has no eval score: its last loss is drawn only where the history is of the loss.
    stopped = [(i, r.score(objective)) for i, r in enumerate(records, 1) if r.status(budget) == "stopped"]
    stopped = [(i, v) for i, v in stopped if finite(v)]
    if stopped:
        history.scatter(
            [i for i, _ in stopped], [v for _, v in stopped], marker="x", color="grey", label="stopped early (its last)"
        )
    if results or stopped:
        history.legend(fontsize="small")
    better = "lower" if objective.mode == "min" else "higher"
    history.set(xlabel="trial (in order)", ylabel=f"{objective.key} ({better} is better)", title="optimisation history")
    history.grid(alpha=0.3)
    if importances:
        keys = sorted(importances, key=importances.get)
        weights.barh(keys, [importances[k] for k in keys])
    else:
        weights.text(0.5, 0.5, "needs two trials that trained their budget", ha="center", va="center")
    weights.set(xlabel="importance (Optuna fANOVA)", title="parameter importances")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
