"""The eval tasks scored through a served endpoint: the harness's ``local-completions`` backend sends them to an
OpenAI-compatible ``/v1/completions`` (Loom's, behind its keys and prices, or any other), so what is scored is
what the endpoint's users get: its engine, its dtype, its limits.

``loom eval RECIPE --endpoint URL --model ID`` builds the run's tasks from its held-out documents (as the
stage does, the same files) and writes, under ``<run>/eval/endpoint/<model>/``, the harness's result and sample
files and ``scores.json``. The API key comes from the environment (``LOOM_API_KEY``), never the command line,
and is sent only as the request header: the harness records its model arguments, not the header.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.artifacts import DataOutputs, EvalResults, ModelScores
from pipelines.eval.config import EvalConfig
from pipelines.eval.stage import HARNESS_ENV, read_heldout, score
from pipelines.eval.tasks import build_tasks
from pipelines.runs import RunDir

API_KEY_ENV = "LOOM_API_KEY"
SCORES = "scores.json"


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible endpoint and the served model to score."""

    url: str  # its base URL, ``https://host:port/v1``
    model: str  # the served model id
    api_key: str = field(repr=False)
    ca_file: str | None = None  # the CA its certificate is checked against (None: the system's)

    @property
    def completions_url(self) -> str:
        return self.url.rstrip("/") + "/completions"


def endpoint_dir(run: RunDir, model: str) -> Path:
    return EvalResults.at(run).root / "endpoint" / re.sub(r"[^A-Za-z0-9_.-]+", "_", model)


def load_endpoint(endpoint: Endpoint, tokenizer: Path, max_length: int, config: EvalConfig, batch_size: int):
    """The harness's ``local-completions`` model for the endpoint. Token-id prompts, counted by the run's own
    tokenizer (the one the endpoint serves with); one request at a time, on the harness's ``requests`` path:
    ``verify`` takes a CA file there, its aiohttp path (``num_concurrent`` > 1) takes only True or False."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(
        base_url=endpoint.completions_url,
        model=endpoint.model,
        tokenizer=str(tokenizer),
        tokenizer_backend="huggingface",  # "auto" probes /tokenizer_info, which Loom's ingress does not serve
        tokenized_requests=True,
        max_length=max_length,
        max_gen_toks=config.max_gen_tokens,
        batch_size=batch_size,
        num_concurrent=1,
        verify_certificate=endpoint.ca_file or True,
        header={"Authorization": f"Bearer {endpoint.api_key}"},
    )


def score_endpoint(
    run: RunDir, endpoint: Endpoint, config: EvalConfig, seed: int, batch_size: int = 1
) -> tuple[ModelScores, Path]:
    """The run's eval tasks through ``endpoint``; its scores and where they were written."""
    import os

    for name, value in HARNESS_ENV.items():
        os.environ.setdefault(name, value)
    data = DataOutputs.of(run)
    out = endpoint_dir(run, endpoint.model)
    shutil.rmtree(out, ignore_errors=True)
    if config.continuation_chars > data.seq_len:
        config = config.model_copy(update={"continuation_chars": data.seq_len})
    tasks = build_tasks(read_heldout(data), config, out / "tasks", seed)
    model = load_endpoint(endpoint, data.tokenizer, data.seq_len, config, batch_size)
    harness = out / "harness"
    harness.mkdir(parents=True)
    scores = score(model, Path(endpoint.url), tasks, harness, seed)
    scores = scores.model_copy(update={"path": f"{endpoint.url} model={endpoint.model}"})
    (out / SCORES).write_text(
        json.dumps(
            {
                "endpoint": endpoint.url,
                "model": endpoint.model,
                "tasks": {t.name: {"headline": t.headline, "lower_is_better": t.lower_is_better} for t in tasks},
                "scores": scores.model_dump(mode="json"),
            },
            indent=2,
        )
        + "\n"
    )
    return scores, out
