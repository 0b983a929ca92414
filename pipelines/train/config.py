"""The ``train`` section of a recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.model.config import ModelConfig
from pipelines.schema import StrictModel


class TrainConfig(StrictModel):
    num_workers: int = Field(default=2, ge=1, description="Ray Train workers (one DeepSpeed rank each).")
    use_gpu: bool = Field(default=False, description="Give each worker a GPU (NCCL) instead of CPU (gloo).")
    cpus_per_worker: float = Field(default=1, gt=0, description="Logical CPUs reserved per worker.")
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="Architecture of the model trained from scratch."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="Training precision. fp16 uses dynamic loss scaling."
    )
    micro_batch_size: int = Field(default=4, ge=1, description="Sequences per worker per forward pass.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    lr: float = Field(default=3e-3, gt=0, le=1, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(default=5, ge=0, description="Linear warmup steps before cosine decay.")
    max_steps: int = Field(default=40, ge=1, description="Optimizer steps to train.")
    grad_clip: float = Field(default=1.0, ge=0, description="Gradient norm clipping (0: off).")
    checkpoint_every: int = Field(default=20, ge=1, description="Save a checkpoint every this many steps.")
    num_checkpoints_to_keep: int = Field(default=2, ge=1, description="Checkpoints Ray Train keeps.")
    max_failures: int = Field(default=2, ge=0, description="Worker-group restarts allowed (from the last checkpoint).")
    log_every: int = Field(default=5, ge=1, description="Report metrics every this many steps.")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.precision == "bf16" and not self.use_gpu and self.zero_stage == 0:
            # DeepSpeed's bf16 path without ZeRO needs a GPU optimizer wrapper.
            raise ValueError("precision 'bf16' on CPU needs zero_stage >= 1")
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError("precision 'fp16' needs use_gpu: true (CPU has no fp16 kernels for training)")
        return self

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.num_workers
