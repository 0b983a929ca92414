"""The ``serve`` section of a recipe: the models on the endpoint, their engines and scaling, and the
ingress's protection (keys, limits, guard)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.compress.variants import family_of, servable_on_vllm
from pipelines.eval.bounds import EvalBound
from pipelines.schema import StrictModel, field_problems

#: The candidate's model id beside ``MODEL`` (a canary release); '@' is outside the ids a recipe may give.
CANARY = "@canary"


def canary_id(model_id: str) -> str:
    return f"{model_id}{CANARY}"


class SpeculativeConfig(StrictModel):
    """Speculative decoding with a distilled student of the run's compress stage as the draft (vLLM's
    draft-model method): the draft proposes tokens, the served model checks them all in one step."""

    draft: str | None = Field(
        default=None,
        description="A distilled variant by name (distilled-..., see compress/variants/). Unset: the student the "
        "compress stage measured as the trained model's draft (compress/pareto.json 'draft').",
    )
    num_speculative_tokens: int = Field(default=3, ge=1, le=16, description="Tokens the draft proposes per step.")

    @field_validator("draft")
    @classmethod
    def _distilled(cls, draft: str | None) -> str | None:
        if draft is not None and family_of(draft) != "distill":
            raise ValueError(
                f"{draft!r} is no distilled variant (distilled-...): a draft must be a smaller model with the "
                "served model's tokenizer"
            )
        return draft


class EngineConfig(StrictModel):
    """vLLM engine arguments Loom validates; everything vLLM accepts beyond these stays vLLM's default."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(default="auto", description="vLLM weight dtype.")
    max_model_len: int = Field(default=256, ge=8, description="Longest prompt + completion vLLM accepts, in tokens.")
    kv_cache_space_gib: int = Field(
        default=1, ge=1, description="KV cache size in GiB per CPU replica (VLLM_CPU_KVCACHE_SPACE)."
    )
    gpu_memory_utilization: float = Field(
        default=0.85, gt=0, le=1, description="Share of GPU memory vLLM may use (GPU only)."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per replica (GPU only).")
    max_num_seqs: int = Field(default=32, ge=1, description="Sequences one engine batches at once.")
    scheduling: Literal["fair", "fcfs"] = Field(
        default="fair",
        description="fair: vLLM's priority scheduling, each request's priority set by the ingress from the tokens its "
        "caller already has in flight (a caller with less work waiting goes first, so one key flooding within its "
        "budget cannot starve another); fcfs: first come, first served.",
    )
    enforce_eager: bool = Field(
        default=False,
        description="Run the model eagerly, without torch.compile: a replica starts tens of seconds sooner on CPU "
        "and decodes somewhat slower (vLLM's enforce_eager).",
    )
    speculative: SpeculativeConfig | None = Field(
        default=None, description="Speculative decoding with a distilled draft (unset: none)."
    )


class AutoscalingConfig(StrictModel):
    """Ray Serve autoscaling of one model's replicas."""

    min_replicas: int = Field(default=1, ge=0, description="Lower bound on replicas.")
    initial_replicas: int | None = Field(default=None, ge=0, description="Replicas at start (unset: min_replicas).")
    max_replicas: int = Field(default=1, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(
        default=16, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(default=30, ge=0, description="Load must stay high this long before adding.")
    downscale_delay_s: float = Field(default=600, ge=0, description="Load must stay low this long before removing.")
    metrics_interval_s: float = Field(default=10, gt=0, description="How often replicas report their load.")
    look_back_period_s: float = Field(default=30, gt=0, description="Window the load is averaged over.")

    @property
    def initial(self) -> int:
        return self.initial_replicas if self.initial_replicas is not None else self.min_replicas


class VariantChoice(StrictModel):
    """Which variant of the run's compress stage (``compress/variants/<name>``) a model serves: one by name,
    or the one a rule picks among the front's variants this accelerator's vLLM can serve."""

    name: str | None = Field(default=None, description="A variant by name, e.g. w8a8-int8 (see compress/pareto.json).")
    rule: Literal["smallest", "fastest"] | None = Field(
        default=None,
        description="smallest: the fewest weight bytes; fastest: the most tokens/s; among the servable variants "
        "within max_perplexity_increase.",
    )
    max_perplexity_increase: float = Field(
        default=0.02,
        gt=0,
        description="rule: a variant qualifies if its perplexity is at most the base's (same engine) x 1 + this.",
    )
    eval_bounds: list[EvalBound] = Field(
        default_factory=list,
        description="Bounds on the run's eval scores (the eval stage's tasks, against the base model) every "
        "variant must keep to be served: the rule picks among those that keep them; a named variant that "
        "does not is refused. Empty: perplexity alone decides.",
    )

    @model_validator(mode="after")
    def _one_way(self) -> VariantChoice:
        if (self.name is None) == (self.rule is None):
            raise ValueError("give either name or rule")
        if self.name is not None and family_of(self.name) is None:
            raise ValueError(
                f"{self.name!r} is no variant name the compress stage gives (bnb-int8, w8a8-int8, pruned-..., distilled-...)"
            )
        return self


class CanaryGate(StrictModel):
    """When the candidate has answered ``requests`` requests, it is promoted if every bound holds, else rolled back.
    Each decision is an audit line with its figures."""

    requests: int = Field(default=200, ge=1, description="Candidate answers judged before deciding.")
    max_error_ratio: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="Largest share of the candidate's requests that may fail: a 5xx, or a refusal by its engine "
        "(a request the candidate cannot take is its regression, not the caller's).",
    )
    max_p99_ratio: float | None = Field(
        default=1.5,
        gt=0,
        description="Largest candidate p99 latency / the stable version's p99 over the same window (checked once "
        "the stable version has answered 10 requests in it). Unset: not checked.",
    )
    max_p99_s: float | None = Field(default=None, gt=0, description="Largest candidate p99 latency in seconds.")
    max_perplexity_ratio: float | None = Field(
        default=None,
        gt=0,
        description="Largest held-out perplexity of the candidate / the stable version's, from their lineage (a "
        "compressed variant's own ratio to its base, or both runs' train metrics). A candidate without that "
        "measurement fails the check. Unset: not checked.",
    )
    eval_bounds: list[EvalBound] = Field(
        default_factory=list,
        description="Bounds on the candidate's eval scores against the stable version's, both scored by this run's "
        "eval stage (the trained model or its compressed variants; a version it did not score fails them). "
        "Judged with the other bounds.",
    )


class CanaryConfig(StrictModel):
    """A second version of a model: a weight of its callers, each always the same ones (by a hash of the caller
    and the model), is answered by the candidate. Answers name the version: ``MODEL`` or ``MODEL@canary``."""

    source: str | None = Field(
        default=None, description="Local Hugging Face directory of the candidate (e.g. another run's model)."
    )
    variant: VariantChoice | None = Field(
        default=None, description="The candidate is a variant of this run's compress stage."
    )
    weight: float = Field(
        default=10, ge=0, le=100, description="Percent of the model's callers the candidate answers at start."
    )
    gate: CanaryGate | None = Field(
        default_factory=CanaryGate,
        description="Automatic promotion or rollback (unset: only `loom serve promote` / `rollback` decide).",
    )

    @model_validator(mode="after")
    def _one_candidate(self) -> CanaryConfig:
        if (self.source is None) == (self.variant is None):
            raise ValueError("give the candidate as either source or variant")
        return self


class ModelConfig(StrictModel):
    """One model on the endpoint; clients pick it by its key in ``serve.models``."""

    source: str | None = Field(
        default=None,
        description="Local Hugging Face directory to serve. Unset: the model the run's train stage exported "
        "(or, with variant, one of its compressed variants).",
    )
    variant: VariantChoice | None = Field(
        default=None, description="Serve a variant of the run's compress stage instead of the trained model."
    )
    accelerator: Literal["cpu", "gpu"] = Field(default="cpu", description="Where each vLLM replica runs.")
    cpus_per_replica: float = Field(default=1, gt=0, description="Logical CPUs in each replica's placement bundle.")
    engine: EngineConfig = Field(default_factory=EngineConfig, description="vLLM engine arguments.")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replica autoscaling.")
    max_ongoing_requests: int = Field(
        default=64, ge=1, description="Requests one replica works on at once; more wait in the queue."
    )
    max_queued_requests: int = Field(
        default=256, ge=-1, description="Requests waiting for a replica before new ones get 503 (-1: no bound)."
    )
    canary: CanaryConfig | None = Field(
        default=None,
        description="A candidate version beside this one, answering a weight of the callers (unset: one version).",
    )
    stream_batching_ms: float = Field(
        default=50,
        ge=0,
        description="A streamed answer's chunks after the first are gathered this long and sent as one message "
        "(Ray Serve LLM's stream_batching_interval_ms; the first chunk is sent at once). Longer: more tokens/s "
        "per core, burstier streams; 0: every chunk on its own.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        problems = []
        scaling = self.autoscaling
        if not scaling.min_replicas <= scaling.initial <= scaling.max_replicas:
            problems.append(
                (
                    "autoscaling",
                    f"need min_replicas ({scaling.min_replicas}) <= initial_replicas ({scaling.initial}) "
                    f"<= max_replicas ({scaling.max_replicas})",
                )
            )
        if self.engine.tensor_parallel_size > 1 and self.accelerator != "gpu":
            problems.append(("engine.tensor_parallel_size", "> 1 needs accelerator 'gpu'"))
        if self.variant is not None and self.source is not None:
            problems.append(("variant", "serves the run's compressed variant: leave source unset"))
        family = family_of(self.variant.name) if self.variant is not None and self.variant.name else None
        if family is not None and not servable_on_vllm(family, self.accelerator):
            problems.append(
                (
                    "variant.name",
                    f"{self.variant.name} is a bitsandbytes variant, which vLLM on {self.accelerator} cannot load: "
                    "serve it with accelerator 'gpu', or choose a w8a8 or pruned variant",
                )
            )
        if problems:
            raise field_problems(problems)
        return self


class GuardConfig(StrictModel):
    """Rejects prompts that match known prompt-injection phrasings, before they reach an engine."""

    enabled: bool = Field(default=True, description="Check prompts against the patterns.")
    patterns: dict[str, str] = Field(
        default_factory=lambda: {
            "ignore-instructions": r"\b(ignore|disregard|forget)\b.{0,40}\b(previous|prior|above|earlier)\b.{0,20}"
            r"\b(instructions?|prompts?|rules?)\b",
            "reveal-system-prompt": r"\b(reveal|print|show|repeat)\b.{0,40}\bsystem\s+prompt\b",
            "role-override": r"\byou\s+are\s+now\s+(in\s+)?(developer|dan|jailbreak|unrestricted)\b",
        },
        description="Reason code -> case-insensitive regular expression; a match rejects the request with that reason.",
    )

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, patterns: dict[str, str]) -> dict[str, str]:
        problems = []
        for reason, pattern in patterns.items():
            try:
                re.compile(pattern)
            except re.error as err:
                problems.append((reason, f"not a regular expression: {err}"))
        if problems:
            raise field_problems(problems)
        return patterns


class JwtConfig(StrictModel):
    """Bearer JSON Web Tokens from an identity provider, accepted beside the static API keys (PyJWT verifies
    signature, issuer, audience and expiry). The subject is the caller: its rate bucket and audit name."""

    issuer: str = Field(description="The iss claim every token must carry.")
    audience: str = Field(description="The aud claim every token must carry (this endpoint's name).")
    algorithms: list[Literal["HS256", "RS256"]] = Field(
        default_factory=lambda: ["RS256"], min_length=1, description="Signature algorithms accepted."
    )
    secret_env: str | None = Field(
        default="LOOM_JWT_SECRET", description="HS256: environment variable (of the Serve replicas) with the secret."
    )
    public_key_file: str | None = Field(
        default=None, description="RS256: the issuer's public key, PEM, read at ingress start on every node."
    )
    models_claim: str = Field(
        default="models",
        description="Claim listing the model ids a token may use (a list, or a space-separated string); a "
        "model outside it is a 403. A token without the claim may use every model.",
    )
    rate_claim: str = Field(
        default="rpm", description="Claim with the caller's own requests per minute (unset: requests_per_minute)."
    )
    tokens_claim: str = Field(
        default="tpm", description="Claim with the caller's own tokens per minute (unset: tokens_per_minute)."
    )
    leeway_s: float = Field(default=30, ge=0, description="Clock skew allowed on exp and nbf.")

    @model_validator(mode="after")
    def _keys_for_the_algorithms(self) -> JwtConfig:
        problems = []
        if "HS256" in self.algorithms and not self.secret_env:
            problems.append(("secret_env", "HS256 needs the environment variable holding its secret"))
        if "RS256" in self.algorithms and not self.public_key_file:
            problems.append(("public_key_file", "RS256 needs the issuer's public key file"))
        if problems:
            raise field_problems(problems)
        return self


class ProtectionConfig(StrictModel):
    """What the ingress checks before a request reaches a model."""

    api_keys_env: str | None = Field(
        default="LOOM_API_KEYS",
        description="Environment variable (of the Serve replicas) holding comma-separated API keys.",
    )
    api_keys_file: str | None = Field(
        default=None,
        description="File read at ingress start (on every node): one 'KEY [REQUESTS_PER_MINUTE [BURST "
        "[TOKENS_PER_MINUTE]]]' per line.",
    )
    requests_per_minute: float = Field(
        default=600,
        gt=0,
        allow_inf_nan=False,
        description="Sustained request rate allowed per API key (unless its file line sets one).",
    )
    burst: int = Field(
        default=60, ge=1, description="Requests a key may send at once above its rate (unless its file line sets one)."
    )
    docs: Literal["off", "keyed"] = Field(
        default="off",
        description="FastAPI's /docs, /redoc and /openapi.json: off (404), or keyed (behind the same API key or "
        "JWT as the API).",
    )
    max_concurrent_per_key: int = Field(
        default=32,
        ge=1,
        description="Requests one key may have in progress at once (per ingress replica), streams until their "
        "last chunk; more get 429. Bounds what one key holds of the engines, whatever its rate.",
    )
    reserved_engine_slots: int = Field(
        default=1,
        ge=0,
        description="With fair scheduling: engine slots (a model's max_num_seqs x max_replicas, per ingress replica) "
        "no one key may fill, so another key's request starts at once instead of waiting for the flood's answers to "
        "finish; when a slot frees, the key with the fewest requests in the engines goes next. 0: a key may fill "
        "them all.",
    )
    max_body_bytes: int = Field(default=1 << 20, ge=256, description="Largest request body accepted (413 above).")
    max_prompt_chars: int = Field(default=32_768, ge=1, description="Longest prompt (all messages) in characters.")
    max_tokens: int = Field(default=1024, ge=1, description="Largest max_tokens a request may ask for.")
    max_choices: int = Field(
        default=4, ge=1, description="Largest n (completions per request) and best_of a request may ask for."
    )
    max_total_tokens: int = Field(
        default=4096,
        ge=1,
        description="Largest output a request may ask for in all: max(n, best_of) x max_tokens (an unset "
        "max_tokens counts as the max_tokens limit), so n cannot multiply one request's cost beyond this.",
    )
    tokens_per_minute: float = Field(
        default=100_000,
        gt=0,
        allow_inf_nan=False,
        description="Tokens a key (or JWT subject) may be charged per minute, each request at its price: every "
        "prompt x max(n, best_of) x (its prompt tokens + max_tokens), charged when admitted. A full minute's "
        "worth may be spent at once; more gets 429 with Retry-After and x-ratelimit-* headers.",
    )
    max_request_tokens: int = Field(
        default=16_384,
        ge=1,
        description="Most tokens one request may be priced at (400 above, naming its price).",
    )
    max_prompts: int = Field(
        default=16, ge=1, description="Most prompts in one completions request (a list of strings or of token lists)."
    )
    max_logprobs: int = Field(
        default=5, ge=0, description="Largest logprobs (completions) or top_logprobs (chat) a request may ask for."
    )
    max_stop_sequences: int = Field(default=4, ge=0, description="Most stop sequences in one request.")
    max_messages: int = Field(default=64, ge=1, description="Most messages in one chat request.")
    guard: GuardConfig = Field(default_factory=GuardConfig, description="Prompt-injection guard.")
    jwt: JwtConfig | None = Field(default=None, description="Accept bearer JWTs too (unset: API keys only).")

    @model_validator(mode="after")
    def _total_holds_one_answer(self) -> ProtectionConfig:
        problems = []
        if self.max_total_tokens < self.max_tokens:
            problems.append(
                (
                    "max_total_tokens",
                    f"{self.max_total_tokens} is below max_tokens ({self.max_tokens}): no request fits",
                )
            )
        if self.max_request_tokens > self.tokens_per_minute:
            problems.append(
                (
                    "max_request_tokens",
                    f"{self.max_request_tokens} is above tokens_per_minute ({self.tokens_per_minute:g}): a request "
                    "priced that high could never be admitted",
                )
            )
        if problems:
            raise field_problems(problems)
        return self


class AuditConfig(StrictModel):
    """One JSON line per request, answered or refused: time, caller (the key's digest prefix, never the key),
    client address, route, model, status, refusal reason, latency and token counts."""

    enabled: bool = Field(default=True, description="Write the audit log.")
    path: str | None = Field(
        default=None,
        description="File on each ingress replica's node (rotated by size). Unset: <run>/serve/audit.jsonl when "
        "the serve stage deploys; nothing when the app is deployed some other way.",
    )
    max_bytes: int = Field(default=10 << 20, ge=1024, description="Size at which the file is rotated.")
    backups: int = Field(default=5, ge=0, description="Rotated files kept (audit.jsonl.1 ...).")
    include_prompts: bool = Field(
        default=False, description="Also record each request's prompt or messages (off: prompts are never written)."
    )
    to_serve_log: bool = Field(default=False, description="Also write each line to Ray Serve's replica log.")


class TlsConfig(StrictModel):
    """HTTPS at the endpoint, served by Ray Serve's HTTP proxy (``http_options.ssl_*``)."""

    certfile: str = Field(description="PEM certificate (chain) the endpoint presents, on the head node.")
    keyfile: str = Field(description="PEM private key of the certificate, on the head node; never logged.")
    ca_file: str | None = Field(
        default=None,
        description="CA bundle Loom's own clients on this machine (the demo queries) verify the certificate "
        "with; unset: the system's CAs.",
    )


class ServeConfig(StrictModel):
    models: dict[str, ModelConfig] = Field(
        default_factory=lambda: {"loom-tiny": ModelConfig()},
        min_length=1,
        description="Model id (the 'model' of OpenAI requests) -> how it is served.",
    )
    protection: ProtectionConfig = Field(default_factory=ProtectionConfig, description="Ingress checks.")
    audit: AuditConfig = Field(default_factory=AuditConfig, description="The audit log of requests.")
    host: str = Field(
        default="127.0.0.1", description="Address the HTTP proxy binds; without API keys always 127.0.0.1."
    )
    port: int = Field(default=8000, ge=1, le=65535, description="Port of the OpenAI-compatible endpoint.")
    tls: TlsConfig | None = Field(default=None, description="Serve HTTPS from this certificate (unset: plain HTTP).")
    ingress_replicas: int = Field(
        default=1,
        ge=1,
        description="Replicas of the ingress (Loom's checks in front of every model), spread by Serve's proxy. More "
        "take the per-request cost of the checks off one process; each keeps its own rate buckets, concurrency "
        "counts and engine slots, so every per-key limit holds per replica. On a cluster with at least as many "
        "nodes at deployment, one a node, so that no node's loss takes every ingress with it. 1: Ray's default, "
        "which scales to zero with the models.",
    )
    demo_prompts: list[str] = Field(
        default_factory=lambda: ["def fibonacci(n):", "import os\nimport sys\n", "The standard library"],
        description="Prompts the demo sends after deployment (completions and chat).",
    )
    demo_max_tokens: int = Field(default=24, ge=1, description="max_tokens of each demo request.")

    @model_validator(mode="after")
    def _ids(self) -> ServeConfig:
        bad = [model_id for model_id in self.models if not re.fullmatch(r"[A-Za-z0-9._/-]+", model_id)]
        if bad:
            raise field_problems(
                [(f"models.{model_id}", "model ids use letters, digits and ._/- only") for model_id in bad]
            )
        return self

    @property
    def demo_model(self) -> str:
        return next(iter(self.models))

    @property
    def versions(self) -> dict[str, ModelConfig]:
        """Every version deployed: each model under its own id, its canary's candidate under ``MODEL@canary``
        (the model's settings, the candidate's weights)."""
        versions = {}
        for model_id, model in self.models.items():
            versions[model_id] = model
            if model.canary is not None:
                versions[canary_id(model_id)] = model.model_copy(
                    update={"source": model.canary.source, "variant": model.canary.variant, "canary": None}
                )
        return versions
