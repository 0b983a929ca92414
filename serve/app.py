"""The application builder: a recipe's ``serve`` section -> ``ray.serve.llm`` OpenAI app.

Works three ways, all through ``build_app``:
- Python: ``serve.run(build_app(ServeAppArgs(...).model_dump()))``;
- ``serve run serve.app:build_app serve_config=... model_source=...``;
- a Serve YAML with ``import_path: serve.app:build_app`` and ``args`` (``loom serve`` writes one).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pipelines.schema import StrictModel
from serve.config import ServeConfig


class ServeAppArgs(StrictModel):
    serve_config: ServeConfig = Field(description="The recipe's serve section.")
    model_source: str = Field(description="Local Hugging Face directory of the model to serve.")


def llm_config(config: ServeConfig, model_source: str):
    """One ``LLMConfig`` for the real vLLM engine on CPU or GPU."""
    from ray.serve.llm import LLMConfig

    engine_kwargs: dict[str, Any] = {
        "max_model_len": config.max_model_len,
        "dtype": config.dtype,
        "tensor_parallel_size": config.tensor_parallel_size,
    }
    env_vars: dict[str, str] = {}
    if config.accelerator == "gpu":
        engine_kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        bundles = [{"CPU": config.cpus_per_replica, "GPU": 1}] * config.tensor_parallel_size
    else:
        env_vars["VLLM_CPU_KVCACHE_SPACE"] = str(config.kv_cache_space_gib)
        bundles = [{"CPU": config.cpus_per_replica}]
    initial = config.initial_replicas if config.initial_replicas is not None else config.min_replicas
    return LLMConfig(
        model_loading_config={"model_id": config.model_id, "model_source": model_source},
        engine_kwargs=engine_kwargs,
        placement_group_config={"bundles": bundles},
        runtime_env={"env_vars": env_vars} if env_vars else None,
        deployment_config={
            "autoscaling_config": {
                "min_replicas": config.min_replicas,
                "initial_replicas": initial,
                "max_replicas": config.max_replicas,
                "target_ongoing_requests": config.target_ongoing_requests,
            }
        },
        log_engine_metrics=True,
    )


def build_app(args: dict[str, Any]):
    """Serve application builder (``import_path: serve.app:build_app``)."""
    from ray.serve.llm import build_openai_app

    parsed = ServeAppArgs.model_validate(args)
    return build_openai_app({"llm_configs": [llm_config(parsed.serve_config, parsed.model_source)]})
