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

from pipelines.runs import RunDir, StageResult, hash_dir
from serve.app import ServeAppArgs, build_app
from serve.config import ServeConfig
from serve.demo import query_endpoint

log = logging.getLogger(__name__)
APP_NAME = "loom"


def model_source(config: ServeConfig, run: RunDir) -> Path:
    if config.model_source:
        return Path(config.model_source).resolve()
    if not run.is_complete("train"):
        raise RuntimeError(
            f"the train stage has not completed in {run.root}; run `loom train` or set serve.model_source"
        )
    return run.stage_dir("train") / "model"


def serve_deploy_config(args: ServeAppArgs, config: ServeConfig) -> dict[str, Any]:
    """A Serve config file (``serve deploy``) for the same application."""
    return {
        "http_options": {"host": config.host, "port": config.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "args": args.model_dump(mode="json"),
            }
        ],
    }


def base_url(config: ServeConfig) -> str:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    return f"http://{host}:{config.port}/v1"


def run_serve(config: ServeConfig, run: RunDir) -> StageResult:
    """Deploy (leaving the app running) and send the demo queries."""
    from ray import serve

    source = model_source(config, run)
    if not (source / "config.json").is_file():
        raise RuntimeError(f"{source} is not a Hugging Face model directory (no config.json)")
    args = ServeAppArgs(serve_config=config, model_source=str(source))
    out = run.begin("serve")
    config_path = out / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(serve_deploy_config(args, config), sort_keys=False))

    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(args.model_dump(mode="json")), name=APP_NAME, route_prefix="/", blocking=False)
    url = base_url(config)
    answers = query_endpoint(url, config.model_id, config.demo_prompts, config.demo_max_tokens)
    for answer in answers:
        print(f"\n[{answer.kind}] {answer.prompt!r}\n  -> {answer.text!r}", flush=True)
    return StageResult(
        inputs={"model": hash_dir(source)},
        outputs={"endpoint": url, "model_id": config.model_id, "serve_config": str(config_path)},
        metrics={"demo_answers": len(answers), "demo_nonempty": sum(bool(a.text) for a in answers)},
    )


def shutdown() -> None:
    from ray import serve

    serve.shutdown()
