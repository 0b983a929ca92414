"""The serve stage: deploy the model on Ray Serve + vLLM, write the Serve config, query it.

A deployment is a running service, not an artifact: this stage deploys on every
run. ``<run>/serve/serve_config.yaml`` is the Serve config that was deployed and
works with ``serve deploy`` on a cluster where Loom is installed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from pipelines.artifacts import (
    CompressionFront,
    EvalResults,
    EvalSummary,
    MissingInputError,
    TrainedModel,
    VariantRecord,
    record_of,
)
from pipelines.runs import RunDir, StageResult, hash_dir
from serve.app import CompressionLineage, ModelLineage, ServeAppArgs, SpeculativeLineage, build_app
from serve.config import ModelConfig, ServeConfig, SpeculativeConfig, VariantChoice, canary_id
from serve.demo import query_endpoint
from serve.protection import load_api_keys

log = logging.getLogger(__name__)
APP_NAME = "loom"
SERVE = "serve"  # this stage's folder in the run
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def variant_source(model_id: str, model: ModelConfig, run: RunDir) -> Path:
    """The directory of the compressed variant ``model.variant`` names or its rule picks."""
    from pipelines.compress.variants import VariantUnavailableError, choose

    front = _front(run, f"serve.models.{model_id} serves a compressed variant")
    choice = model.variant
    kept = front.kept()
    try:
        name = choose(
            kept,
            model.accelerator,
            name=choice.name,
            rule=choice.rule,
            max_perplexity_increase=choice.max_perplexity_increase,
            eval_failures=_eval_failures(model_id, choice, list(kept), run),
        )
    except VariantUnavailableError as error:
        raise RuntimeError(f"serve.models.{model_id}.variant: {error}") from None
    return front.variant_dir(name)


def _eval_failures(
    model_id: str, choice: VariantChoice, variants: list[str], run: RunDir
) -> dict[str, list[str]] | None:
    """The eval bounds each variant fails, from the run's eval stage (None when the choice names no bound)."""
    from pipelines.eval.bounds import UnknownBoundError, bound_failures

    if not choice.eval_bounds:
        return None
    where = f"serve.models.{model_id}.variant.eval_bounds"
    summary = _eval_summary(run, f"{where} judges variants by their eval scores")
    try:
        return {name: bound_failures(summary, name, choice.eval_bounds) for name in variants}
    except UnknownBoundError as error:
        raise RuntimeError(f"{where}: {error}") from None


def canary_eval_failures(config: ServeConfig, sources: dict[str, Path], run: RunDir) -> dict[str, list[str]]:
    """For each canary whose gate names eval bounds: the bounds its candidate fails against the stable version,
    both found among the models the run's eval stage scored (the trained model as ``base``, a variant by the
    name in its record), so a run moved elsewhere still finds them."""
    from pipelines.eval.bounds import UnknownBoundError, score_failures

    gated = {
        model_id: model.canary.gate.eval_bounds
        for model_id, model in config.models.items()
        if model.canary is not None and model.canary.gate is not None and model.canary.gate.eval_bounds
    }
    if not gated:
        return {}
    first = f"serve.models.{next(iter(gated))}.canary.gate.eval_bounds"
    summary = _eval_summary(run, f"{first} judges the candidate by its eval scores")
    failures = {}
    for model_id, bounds in gated.items():
        where = f"serve.models.{model_id}.canary.gate.eval_bounds"
        stable = summary.models.get(_scored_name(sources[model_id], run) or "")
        candidate = summary.models.get(_scored_name(sources[canary_id(model_id)], run) or "")
        try:
            failures[model_id] = score_failures(summary, candidate, stable, bounds, against="stable")
        except UnknownBoundError as error:
            raise RuntimeError(f"{where}: {error}") from None
    return failures


def _eval_summary(run: RunDir, what: str) -> EvalSummary:
    try:
        return EvalResults.of(run).summary()
    except MissingInputError as error:
        raise RuntimeError(f"{what}, but {error}") from None


def _scored_name(source: Path, run: RunDir) -> str | None:
    """The name the eval stage gives the model served from ``source``: ``base`` for the run's trained model, a
    variant's record name for one of its compressed variants; None for any other directory."""
    from pipelines.eval.bounds import BASE

    if run.is_complete("train") and source.resolve() == TrainedModel.at(run).path.resolve():
        return BASE
    record = record_of(source)
    if record is not None and source.resolve() == CompressionFront.at(run).variant_dir(record.name).resolve():
        return record.name
    return None


def _front(run: RunDir, what: str) -> CompressionFront:
    try:
        return CompressionFront.of(run)
    except MissingInputError as error:
        raise RuntimeError(f"{what}, but {error}") from None


def draft_source(model_id: str, model: ModelConfig, source: Path, run: RunDir) -> tuple[Path, VariantRecord] | None:
    """The distilled variant ``model`` drafts with (and its record), checked to share ``source``'s tokenizer."""
    from pipelines.compress.variants import VariantUnavailableError, choose_draft
    from pipelines.model.tokenizer import load_tokenizer

    speculative = model.engine.speculative
    if speculative is None:
        return None
    where = f"serve.models.{model_id}.engine.speculative"
    front = _front(run, f"{where} drafts with a distilled student (distill among compress.families)")
    try:
        record = choose_draft(front, speculative.draft)
    except VariantUnavailableError as error:
        raise RuntimeError(f"{where}: {error}") from None
    draft = front.variant_dir(record.name)
    if load_tokenizer(draft).get_vocab() != load_tokenizer(source).get_vocab():
        raise RuntimeError(f"{where}: the draft {record.name} has another tokenizer than {source}; vLLM needs the same")
    return draft, record


def model_sources(config: ServeConfig, run: RunDir) -> dict[str, Path]:
    """Model id -> the directory it is served from; a model without ``source`` is the run's trained model,
    or the compressed variant it asks for."""
    sources = {}
    for model_id, model in config.versions.items():
        if model.source:
            source = Path(model.source).expanduser().resolve()
        elif model.variant is not None:
            source = variant_source(model_id, model, run)
        else:
            try:
                source = TrainedModel.of(run).path
            except MissingInputError:
                raise RuntimeError(
                    f"serve.models.{model_id} serves the trained model, but the train stage has not completed in "
                    f"{run.root}; run `loom train` or set serve.models.{model_id}.source"
                ) from None
        if not (source / "config.json").is_file():
            raise RuntimeError(
                f"serve.models.{model_id}: {source} is not a Hugging Face model directory (no config.json)"
            )
        sources[model_id] = source
    return sources


def compression_lineage(source: Path) -> CompressionLineage | None:
    """What the compress stage recorded beside a variant it kept (None for any other directory)."""
    record = record_of(source)
    return None if record is None else CompressionLineage.of(record)


def speculative_lineage(
    source: Path, draft: tuple[Path, VariantRecord] | None, speculative: SpeculativeConfig | None
) -> SpeculativeLineage | None:
    """The draft a model generates with, and what the compress stage measured when it drafted for this very
    model with as many tokens per step (nothing measured otherwise)."""
    if draft is None or speculative is None:
        return None
    path, record = draft
    tokens = speculative.num_speculative_tokens
    measured = record.speculative
    matches = (
        measured is not None
        and Path(record.lineage.base_model) == source
        and measured["num_speculative_tokens"] == tokens
    )
    return SpeculativeLineage(
        draft=record.name,
        draft_source=str(path),
        num_speculative_tokens=tokens,
        measured_acceptance_rate=measured["acceptance_rate"] if matches else None,
        measured_tokens_per_s_ratio=measured["ratios"]["tokens_per_s"] if matches else None,
    )


def lineage(source: Path, run: RunDir, speculative: SpeculativeLineage | None = None) -> ModelLineage:
    """The run, data and train config hashes behind a model this run trained (or compressed from one it
    trained, with how); just the path otherwise. With the draft it generates with, if any."""
    stages = run.manifest()["stages"]
    train = stages.get("train", {})
    compression = compression_lineage(source)
    trained = TrainedModel.at(run).path if run.is_complete("train") else None
    if trained != source and (compression is None or Path(compression.base_model) != trained):
        return ModelLineage(source=str(source), speculative=speculative)
    return ModelLineage(
        source=str(source),
        run_name=run.root.name,
        data_config_hash=stages.get("data", {}).get("config_hash"),
        train_config_hash=train.get("config_hash"),
        eval={k: v for k, v in train.get("metrics", {}).items() if k.startswith("val_")},
        compression=compression,
        speculative=speculative,
    )


def bound_host(config: ServeConfig, has_keys: bool) -> str:
    """Without API keys or JWTs the endpoint is for this machine only, whatever the recipe asks."""
    authenticated = has_keys or config.protection.jwt is not None
    return config.host if authenticated or config.host in LOOPBACK else "127.0.0.1"


def bind_host(config: ServeConfig, keys: list) -> str:
    """``bound_host``, warning loudly when it overrides the recipe's host."""
    if bound_host(config, bool(keys)) == config.host:
        return config.host
    log.warning(
        "\n" + "!" * 78 + "\n!! serve.host is %s but no API key is configured (%s): binding 127.0.0.1 only.\n"
        "!! Set the keys to expose the endpoint.\n" + "!" * 78,
        config.host,
        config.protection.api_keys_file or f"${config.protection.api_keys_env}",
    )
    return "127.0.0.1"


def http_options(config: ServeConfig, host: str) -> dict[str, Any]:
    """Ray Serve's HTTP proxy options: where it binds, and its certificate when the recipe asks for HTTPS."""
    options: dict[str, Any] = {"host": host, "port": config.port}
    if config.tls is not None:
        options |= {"ssl_certfile": config.tls.certfile, "ssl_keyfile": config.tls.keyfile}
    return options


def check_tls_files(config: ServeConfig) -> None:
    """Missing certificate files named before deploying, instead of a proxy that never starts."""
    if config.tls is None:
        return
    files = {"serve.tls.certfile": config.tls.certfile, "serve.tls.keyfile": config.tls.keyfile}
    if config.tls.ca_file:
        files["serve.tls.ca_file"] = config.tls.ca_file
    missing = [f"{field}: {path}" for field, path in files.items() if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError("TLS files not found: " + "; ".join(missing))


def serve_deploy_config(args: ServeAppArgs, options: dict[str, Any]) -> dict[str, Any]:
    """A Serve config file (``serve deploy``) for the same application."""
    return {
        "http_options": options,
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "args": args.model_dump(mode="json"),
            }
        ],
    }


def endpoint_url(host: str, port: int, https: bool = False) -> str:
    """Where clients on this machine reach an endpoint bound to ``host`` (a wildcard is reached on loopback)."""
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"{'https' if https else 'http'}://{host}:{port}/v1"


def base_url(config: ServeConfig) -> str:
    """``endpoint_url`` of the host the serve stage binds for ``config`` (it reads the API keys to know)."""
    return endpoint_url(bound_host(config, bool(load_api_keys(config.protection))), config.port, config.tls is not None)


def serve_app_args(config: ServeConfig, run: RunDir) -> ServeAppArgs:
    """The application's builder arguments for ``run``'s models, their drafts and the audit log's path."""
    sources = model_sources(config, run)
    versions = config.versions
    drafts = {model_id: draft_source(model_id, versions[model_id], source, run) for model_id, source in sources.items()}
    return ServeAppArgs(
        audit_path=config.audit.path or str(run.stage_dir(SERVE) / "audit.jsonl"),
        canary_eval=canary_eval_failures(config, sources, run),
        serve_config=config,
        model_sources={model_id: str(source) for model_id, source in sources.items()},
        draft_sources={model_id: str(draft[0]) for model_id, draft in drafts.items() if draft},
        lineage={
            model_id: lineage(
                source, run, speculative_lineage(source, drafts[model_id], versions[model_id].engine.speculative)
            )
            for model_id, source in sources.items()
        },
    )


def run_serve(config: ServeConfig, run: RunDir) -> StageResult:
    """Deploy (leaving the app running) and send the demo queries."""
    from ray import serve

    args = serve_app_args(config, run)
    keys = load_api_keys(config.protection)
    host = bind_host(config, keys)
    check_tls_files(config)
    options = http_options(config, host)
    out = run.begin(SERVE)
    config_path = out / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(serve_deploy_config(args, options), sort_keys=False))

    serve.start(http_options=options)
    serve.run(build_app(args.model_dump(mode="json")), name=APP_NAME, route_prefix="/", blocking=False)
    url = endpoint_url(host, config.port, config.tls is not None)
    answers = query_endpoint(
        url,
        config.demo_model,
        config.demo_prompts,
        config.demo_max_tokens,
        api_key=keys[0].key if keys else None,
        ca_file=config.tls.ca_file if config.tls else None,
    )
    for answer in answers:
        print(f"\n[{answer.kind}] {answer.prompt!r}\n  -> {answer.text!r}", flush=True)
    return StageResult(
        inputs={
            **{f"model:{model_id}": hash_dir(Path(source)) for model_id, source in args.model_sources.items()},
            **{f"draft:{model_id}": hash_dir(Path(draft)) for model_id, draft in args.draft_sources.items()},
        },
        outputs={
            "endpoint": url,
            "models": list(args.model_sources),
            "serve_config": str(config_path),
            "audit_log": args.audit_path if config.audit.enabled else None,
        },
        metrics={"demo_answers": len(answers), "demo_nonempty": sum(bool(a.text) for a in answers)},
    )


def shutdown() -> None:
    from ray import serve

    serve.shutdown()


def canary_controller():
    """The handle of the running app's canary controller, or an error saying why there is none."""
    from ray import serve

    try:
        return serve.get_deployment_handle("CanaryController", app_name=APP_NAME)
    except Exception as err:  # Serve names a missing app or deployment in a ValueError/RayServeException
        raise RuntimeError(
            f"no canary controller in the Serve app {APP_NAME!r} on this cluster (is a model with serve.models.<id>."
            f"canary deployed?): {str(err)[:300]}"
        ) from None


def decide_canary(model_id: str, decision: str) -> dict[str, Any]:
    """Promote or roll back ``model_id``'s canary by hand (the ingress audits the change)."""
    answer = canary_controller().decide.remote(model_id, decision).result(timeout_s=30)
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer


def canary_status() -> dict[str, dict[str, Any]]:
    return canary_controller().status.remote().result(timeout_s=30)
