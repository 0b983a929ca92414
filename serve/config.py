"""The ``serve`` section of a recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipelines.schema import StrictModel


class ServeConfig(StrictModel):
    model_id: str = Field(
        default="loom-tiny",
        pattern=r"^[A-Za-z0-9._/-]+$",
        description="Name clients use in the 'model' field of OpenAI requests.",
    )
    model_source: str | None = Field(
        default=None,
        description="Local Hugging Face directory to serve. Unset: the model the train stage exported.",
    )
    accelerator: Literal["cpu", "gpu"] = Field(default="cpu", description="Where each vLLM replica runs.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="vLLM weight dtype.")
    max_model_len: int = Field(default=256, ge=8, description="Longest prompt + completion vLLM accepts.")
    kv_cache_space_gib: int = Field(
        default=1, ge=1, description="KV cache size in GiB per CPU replica (VLLM_CPU_KVCACHE_SPACE)."
    )
    gpu_memory_utilization: float = Field(
        default=0.85, gt=0, le=1, description="Share of GPU memory vLLM may use (GPU only)."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per replica (GPU only).")
    cpus_per_replica: float = Field(default=1, gt=0, description="Logical CPUs in each replica's placement bundle.")
    min_replicas: int = Field(default=1, ge=0, description="Autoscaling lower bound.")
    initial_replicas: int | None = Field(default=None, ge=0, description="Replicas at start (unset: min_replicas).")
    max_replicas: int = Field(default=1, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(
        default=16, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    host: str = Field(default="127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the OpenAI-compatible endpoint.")
    demo_prompts: list[str] = Field(
        default_factory=lambda: ["def fibonacci(n):", "import os\nimport sys\n", "The standard library"],
        description="Prompts the demo sends after deployment (completions and chat).",
    )
    demo_max_tokens: int = Field(default=24, ge=1, description="max_tokens of each demo request.")

    @model_validator(mode="after")
    def _replicas(self) -> ServeConfig:
        initial = self.initial_replicas if self.initial_replicas is not None else self.min_replicas
        if not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"need min_replicas ({self.min_replicas}) <= initial_replicas ({initial}) "
                f"<= max_replicas ({self.max_replicas})"
            )
        if self.tensor_parallel_size > 1 and self.accelerator != "gpu":
            raise ValueError("tensor_parallel_size > 1 needs accelerator 'gpu'")
        return self
