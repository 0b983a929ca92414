"""The application builder: a recipe's ``serve`` section -> one OpenAI endpoint over ``ray.serve.llm``.

Works three ways, all through ``build_app``:
- Python: ``serve.run(build_app(ServeAppArgs(...).model_dump()))``;
- ``serve run serve.app:build_app serve_config=... model_sources=...``;
- a Serve YAML with ``import_path: serve.app:build_app`` and ``args`` (``loom serve`` writes one).

It is Ray's public ``build_openai_app`` (one ``LLMServer`` deployment per model, one ingress) with
Loom's ingress in place of the stock one, through ``ingress_cls_config``.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from pipelines.artifacts import VariantRecord
from pipelines.schema import StrictModel
from serve.config import ModelConfig, ServeConfig, canary_id


class CompressionLineage(StrictModel):
    """How a served variant was made from the run's trained model, and what the compress stage measured."""

    variant: str = Field(description="The variant's name (its directory under compress/variants/).")
    family: str = Field(description="The compression family (bnb_int8, bnb_nf4, w8a8, prune).")
    recipe: dict[str, str | float | int | None] = Field(
        description="The family's knobs and the shape they gave (e.g. kv_head_groups, mlp_channels)."
    )
    measured_in: str = Field(description="The engine the objectives were measured in (vllm or transformers).")
    perplexity: float = Field(description="Held-out perplexity.")
    weight_bytes: int = Field(description="Bytes on disk of the weights.")
    tokens_per_s: float = Field(description="Generation tokens/s at the compress stage's fixed load.")
    p50_latency_ms: float = Field(description="Median request latency at that load.")
    ratios: dict[str, float] = Field(description="perplexity, weight_bytes, tokens_per_s over the base model's.")
    base_model: str = Field(description="The trained model it was made from.")

    @classmethod
    def of(cls, record: VariantRecord) -> CompressionLineage:
        """The served part of the compress stage's record."""
        return cls(
            variant=record.name,
            family=record.family,
            recipe={k: v for k, v in record.recipe.items() if k not in ("params", "description")},
            measured_in=record.engine,
            perplexity=record.perplexity,
            weight_bytes=record.weight_bytes,
            tokens_per_s=record.tokens_per_s,
            p50_latency_ms=record.p50_latency_ms,
            ratios=record.ratios,
            base_model=record.lineage.base_model,
        )


class SpeculativeLineage(StrictModel):
    """The draft a model generates with (speculative decoding) and what the compress stage measured of it."""

    draft: str = Field(description="The distilled variant drafting (its directory under compress/variants/).")
    draft_source: str = Field(description="Directory the draft was loaded from.")
    num_speculative_tokens: int = Field(description="Tokens the draft proposes per step.")
    measured_acceptance_rate: float | None = Field(
        default=None,
        description="Share of proposed tokens the model accepted when the compress stage measured this pair with "
        "as many tokens per step (unset: not measured so).",
    )
    measured_tokens_per_s_ratio: float | None = Field(
        default=None, description="Tokens/s with the draft over without it, in that measurement."
    )


class ModelLineage(StrictModel):
    """Where a served model came from, shown in ``/v1/models``."""

    source: str = Field(description="Directory the model was loaded from.")
    run_name: str | None = Field(default=None, description="Loom run that trained it (unset: an outside model).")
    data_config_hash: str | None = Field(default=None, description="Config hash of that run's data stage.")
    train_config_hash: str | None = Field(default=None, description="Config hash of that run's train stage.")
    eval: dict[str, float] = Field(default_factory=dict, description="Held-out metrics the train stage recorded.")
    compression: CompressionLineage | None = Field(
        default=None, description="For a compressed variant: how it was made and what it measured."
    )
    speculative: SpeculativeLineage | None = Field(
        default=None, description="The draft model of speculative decoding, if the model has one."
    )


class ServeAppArgs(StrictModel):
    serve_config: ServeConfig = Field(description="The recipe's serve section.")
    model_sources: dict[str, str] = Field(description="Model id -> local Hugging Face directory it is served from.")
    draft_sources: dict[str, str] = Field(
        default_factory=dict,
        description="Model id -> directory of its speculative draft (models with engine.speculative set).",
    )
    lineage: dict[str, ModelLineage] = Field(default_factory=dict, description="Model id -> its lineage.")
    canary_eval: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Model id -> the eval bounds of its canary's gate the candidate fails against the stable "
        "version (empty: it keeps them all); only models whose gate names eval bounds.",
    )
    audit_path: str | None = Field(
        default=None,
        description="The audit log's file (serve.audit.path, or the one the serve stage chose); unset: none.",
    )

    @model_validator(mode="after")
    def _every_model_has_a_source(self) -> ServeAppArgs:
        missing = sorted(set(self.serve_config.versions) - set(self.model_sources))
        if missing:
            raise ValueError(f"model_sources lacks a directory for: {', '.join(missing)}")
        models = self.serve_config.versions
        drafting = {model_id for model_id, model in models.items() if model.engine.speculative is not None}
        if drafting != set(self.draft_sources):
            raise ValueError(
                f"draft_sources must name the draft of exactly the models with engine.speculative ({sorted(drafting)}); "
                f"it names {sorted(self.draft_sources)}"
            )
        return self


def llm_config(model_id: str, model: ModelConfig, source: str, draft: str | None = None):
    """One ``LLMConfig`` for the real vLLM engine on CPU or GPU (with ``draft`` proposing tokens, if given)."""
    from ray.serve.llm import LLMConfig

    from serve.engine import LocalModelCallback, LoomLLMServer

    engine = model.engine
    engine_kwargs: dict[str, Any] = {
        "max_model_len": engine.max_model_len,
        "dtype": engine.dtype,
        "tensor_parallel_size": engine.tensor_parallel_size,
        "max_num_seqs": engine.max_num_seqs,
        "enforce_eager": engine.enforce_eager,
        "scheduling_policy": "priority" if engine.scheduling == "fair" else "fcfs",
    }
    if engine.speculative is not None:
        if draft is None:
            raise ValueError(f"{model_id} has engine.speculative set but no draft directory")
        engine_kwargs["speculative_config"] = {
            "method": "draft_model",
            "model": draft,
            "num_speculative_tokens": engine.speculative.num_speculative_tokens,
        }
    env_vars: dict[str, str] = {}
    if model.accelerator == "gpu":
        engine_kwargs["gpu_memory_utilization"] = engine.gpu_memory_utilization
        bundles = [{"CPU": model.cpus_per_replica, "GPU": 1}] * engine.tensor_parallel_size
    else:
        env_vars["VLLM_CPU_KVCACHE_SPACE"] = str(engine.kv_cache_space_gib)
        bundles = [{"CPU": model.cpus_per_replica}]
    scaling = model.autoscaling
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": source},
        engine_kwargs=engine_kwargs,
        placement_group_config={"bundles": bundles},
        callback_config={"callback_class": LocalModelCallback},
        runtime_env={"env_vars": env_vars} if env_vars else None,
        deployment_config={
            "autoscaling_config": {
                "min_replicas": scaling.min_replicas,
                "initial_replicas": scaling.initial,
                "max_replicas": scaling.max_replicas,
                "target_ongoing_requests": scaling.target_ongoing_requests,
                "upscale_delay_s": scaling.upscale_delay_s,
                "downscale_delay_s": scaling.downscale_delay_s,
                "metrics_interval_s": scaling.metrics_interval_s,
                "look_back_period_s": scaling.look_back_period_s,
            },
            "max_ongoing_requests": model.max_ongoing_requests,
            "max_queued_requests": model.max_queued_requests,
        },
        log_engine_metrics=True,
        server_cls=LoomLLMServer,
        experimental_configs={"stream_batching_interval_ms": model.stream_batching_ms},
    )


def canaries(parsed: ServeAppArgs, lineage: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each canary's start: its weight, its gate, and the candidate's perplexity over the stable version's."""
    from serve.canary import perplexity_ratio

    return {
        model_id: {
            "weight": model.canary.weight,
            "gate": model.canary.gate.model_dump(mode="json") if model.canary.gate else None,
            "perplexity_ratio": perplexity_ratio(lineage[model_id], lineage[canary_id(model_id)]),
            "eval_failures": parsed.canary_eval.get(model_id),
        }
        for model_id, model in parsed.serve_config.models.items()
        if model.canary is not None
    }


def build_app(args: dict[str, Any]):
    """Serve application builder (``import_path: serve.app:build_app``)."""
    from ray import serve
    from ray.serve.llm import LLMServingArgs, build_openai_app

    from serve.canary import CanaryController
    from serve.ingress import LoomIngress

    parsed = ServeAppArgs.model_validate(args)
    sources = parsed.model_sources
    models = parsed.serve_config.versions
    lineage = {
        model_id: (parsed.lineage.get(model_id) or ModelLineage(source=sources[model_id])).model_dump()
        for model_id in models
    }
    releases = canaries(parsed, lineage)
    controller = (
        serve.deployment(
            CanaryController, name="CanaryController", num_replicas=1, ray_actor_options={"num_cpus": 0}
        ).bind(releases)
        if releases
        else None
    )
    return build_openai_app(
        LLMServingArgs(
            llm_configs=[
                llm_config(model_id, model, sources[model_id], parsed.draft_sources.get(model_id))
                for model_id, model in models.items()
            ],
            ingress_cls_config={
                "ingress_cls": LoomIngress,
                "ingress_extra_kwargs": {
                    "protection": parsed.serve_config.protection.model_dump(mode="json"),
                    "lineage": lineage,
                    "audit": parsed.serve_config.audit.model_dump(mode="json"),
                    "audit_path": parsed.audit_path or parsed.serve_config.audit.path,
                    "max_replicas": {model_id: model.autoscaling.max_replicas for model_id, model in models.items()},
                    "engine_slots": {
                        model_id: model.engine.max_num_seqs * model.autoscaling.max_replicas
                        for model_id, model in models.items()
                        if model.engine.scheduling == "fair"
                    },
                    "pricing": {
                        model_id: {
                            "tokenizer": sources[model_id],
                            "context": model.engine.max_model_len,
                            "fair": model.engine.scheduling == "fair",
                        }
                        for model_id, model in models.items()
                    },
                    "canaries": {model_id: release["weight"] for model_id, release in releases.items()},
                    "canary_controller": controller,
                },
            },
            ingress_deployment_config=ingress_options(parsed.serve_config.ingress_replicas, alive_nodes()),
        )
    )


def ingress_options(replicas: int, nodes: int = 1) -> dict[str, Any]:
    """The ingress deployment's options: Ray's defaults for one replica, else exactly ``replicas``, one a node when
    the cluster has ``nodes`` enough for that (Serve would otherwise place a replica that replaces a lost one
    anywhere, the node of the other replica too, whose loss then takes every ingress with it)."""
    if replicas == 1:
        return {}
    options: dict[str, Any] = {
        "autoscaling_config": {"min_replicas": replicas, "initial_replicas": replicas, "max_replicas": replicas}
    }
    if nodes >= replicas:
        options["max_replicas_per_node"] = 1
    return options


def alive_nodes() -> int:
    """The cluster's live nodes; 1 where the app is built outside a Ray connection (nothing to spread over)."""
    import ray

    if not ray.is_initialized():
        return 1
    return sum(node["Alive"] for node in ray.nodes())
