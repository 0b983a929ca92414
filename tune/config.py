"""The ``tune`` section of a recipe: the sweep's search space over ``train.*`` keys and its budget."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from pipelines.eval.bounds import EvalMetric
from pipelines.schema import StrictModel, pydantic_problems
from pipelines.train.config import TrainConfig, Workers


class Distribution(StrictModel):
    """One dimension of the search space: where Optuna may draw a ``train.*`` value from."""

    kind: Literal["loguniform", "uniform", "int", "choice"] = Field(
        description="loguniform / uniform: a float in [low, high]; int: an integer in [low, high]; "
        "choice: one of values."
    )
    low: float | None = Field(default=None, description="Lower bound (loguniform, uniform, int).")
    high: float | None = Field(default=None, description="Upper bound, inclusive (loguniform, uniform, int).")
    values: list[bool | int | float | str] | None = Field(default=None, description="The candidates (choice).")

    @model_validator(mode="after")
    def _shape(self) -> Distribution:
        if self.kind == "choice":
            if not self.values or self.low is not None or self.high is not None:
                raise ValueError("choice takes a non-empty values list and no low/high")
            return self
        if self.low is None or self.high is None or self.values is not None:
            raise ValueError(f"{self.kind} takes low and high, and no values")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        if self.kind == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError(f"int needs whole bounds (got {self.low}, {self.high})")
        return self

    def extremes(self) -> list[Any]:
        """The values that bound what a trial can be given: both ends, or every choice."""
        if self.kind == "choice":
            return list(self.values or [])
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def sampler(self):
        """The Ray Tune search-space object (Optuna's TPE reads it through ``OptunaSearch``)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values or []))
        if self.kind == "int":
            return tune.randint(int(self.low), int(self.high) + 1)  # randint's upper bound is exclusive
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(self.low, self.high)

    def optuna(self):
        """The same dimension as an Optuna distribution (for Optuna's parameter importances)."""
        from optuna import distributions

        if self.kind == "choice":
            return distributions.CategoricalDistribution(list(self.values or []))
        if self.kind == "int":
            return distributions.IntDistribution(int(self.low), int(self.high))
        return distributions.FloatDistribution(self.low, self.high, log=self.kind == "loguniform")


def _default_space() -> dict[str, Distribution]:
    return {"train.lr": Distribution(kind="loguniform", low=1e-4, high=1e-2)}


class TuneConfig(StrictModel):
    enabled: bool = Field(default=True, description="Run the sweep as part of `loom run`.")
    space: dict[str, Distribution] = Field(
        default_factory=_default_space,
        description="Search space: a dotted train key (e.g. train.lr, train.warmup_steps, train.model.num_layers) "
        "to the distribution its trials draw from. Every other train value is the recipe's.",
    )
    num_trials: int = Field(default=2, ge=1, description="Trials Optuna proposes.")
    max_steps_per_trial: int = Field(default=10, ge=1, description="Optimizer steps each trial trains.")
    workers_per_trial: Workers = Field(
        default=1,
        description="Ray Train workers per trial: a number, or [min, max] for elastic trials (as train.num_workers). "
        "Gradient accumulation is rescaled so that a trial keeps the recipe's global batch size.",
    )
    max_concurrent_trials: int = Field(default=1, ge=1, description="Trials running at once.")
    search: Literal["tpe", "random"] = Field(
        default="tpe",
        description="How Optuna proposes each trial's values: tpe (Tree-structured Parzen Estimator, learning from "
        "the trials so far) or random (independent draws; the baseline TPE is measured against). Seeded by the "
        "recipe's seed.",
    )
    startup_trials: int = Field(
        default=4,
        ge=1,
        description="tpe: trials drawn at random before TPE models the results (Optuna's n_startup_trials). "
        "Optuna's default of 10 would leave a sweep of 10 trials or fewer entirely random.",
    )
    scheduler: Literal["asha", "fifo"] = Field(
        default="asha",
        description="asha: stop a trial at a rung (grace_period_steps x reduction_factor^k steps) when its held-out "
        "loss is outside the best 1/reduction_factor of the trials that reached that rung before it; "
        "fifo: every trial trains its whole budget.",
    )
    grace_period_steps: int = Field(
        default=2, ge=1, description="ASHA's first rung: no trial is stopped before this many optimizer steps."
    )
    reduction_factor: float = Field(
        default=2.0, gt=1, description="ASHA keeps the best 1/reduction_factor of the trials at each rung."
    )
    objective: EvalMetric | None = Field(
        default=None,
        description="What picks the best trial. Unset: the held-out loss at the trial's budget. An eval task "
        "(e.g. {task: loom_choice}), built from the held-out documents as the eval section says: each trial that "
        "trains its budget exports its model, which lm-evaluation-harness scores on it, and the best score wins. "
        "ASHA still stops trials at its rungs by held-out loss, the one figure every report has.",
    )

    @field_validator("space")
    @classmethod
    def _train_keys(cls, space: dict[str, Distribution]) -> dict[str, Distribution]:
        if not space:
            raise ValueError("needs at least one dimension, e.g. {train.lr: {kind: loguniform, low: 1e-4, high: 1e-2}}")
        outside = [key for key in space if not key.startswith("train.")]
        if outside:
            raise ValueError(f"searches train.* keys only; not: {', '.join(outside)}")
        return space

    @model_validator(mode="after")
    def _rungs_fit_the_budget(self) -> TuneConfig:
        if self.scheduler == "asha" and self.grace_period_steps > self.max_steps_per_trial:
            raise ValueError(
                f"grace_period_steps ({self.grace_period_steps}) must not exceed max_steps_per_trial "
                f"({self.max_steps_per_trial}): ASHA would never compare trials"
            )
        return self


def trial_of(train: TrainConfig, tune: TuneConfig, params: dict[str, Any]) -> TrainConfig:
    """The training config one of this sweep's trials runs (``TrainConfig.for_trial`` at the sweep's budget)."""
    return train.for_trial(params, steps=tune.max_steps_per_trial, workers=tune.workers_per_trial)


def space_problems(tune: TuneConfig, train: TrainConfig) -> list[tuple[str, str]]:
    """Every way a trial could be refused, named by its space key, before any trial starts: a key
    train does not have, or an extreme of its distribution that train (or the trial shape) refuses."""
    problems = []
    for key, distribution in tune.space.items():
        for value in distribution.extremes():
            try:
                trial_of(train, tune, {key: value})
            except KeyError as error:
                problems.append((f"tune.space.{key}", error.args[0]))
                break
            except (ValidationError, ValueError) as error:
                reasons = (
                    "; ".join(f"{field}: {message}" for field, message in pydantic_problems(error))
                    if isinstance(error, ValidationError)
                    else str(error)
                )
                problems.append((f"tune.space.{key}", f"a trial with {key}={value!r} would be refused: {reasons}"))
    return problems
