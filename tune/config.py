"""The ``tune`` section of a recipe."""

from __future__ import annotations

from pydantic import Field, model_validator

from pipelines.schema import StrictModel


class TuneConfig(StrictModel):
    enabled: bool = Field(default=True, description="Run the sweep as part of `loom run`.")
    num_trials: int = Field(default=2, ge=1, description="Trials Optuna proposes.")
    lr_min: float = Field(default=1e-4, gt=0, description="Lower bound of the log-uniform learning-rate search.")
    lr_max: float = Field(default=1e-2, gt=0, description="Upper bound of the log-uniform learning-rate search.")
    max_steps_per_trial: int = Field(default=10, ge=1, description="Optimizer steps each trial trains.")
    workers_per_trial: int = Field(default=1, ge=1, description="Ray Train workers per trial.")
    max_concurrent_trials: int = Field(default=1, ge=1, description="Trials running at once.")

    @model_validator(mode="after")
    def _bounds(self) -> TuneConfig:
        if self.lr_min >= self.lr_max:
            raise ValueError(f"lr_min ({self.lr_min}) must be below lr_max ({self.lr_max})")
        return self
