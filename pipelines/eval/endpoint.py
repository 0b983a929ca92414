"""The eval tasks scored through a served endpoint: the harness's ``local-completions`` backend sends them to an
OpenAI-compatible ``/v1/completions`` (Loom's, behind its keys and prices, or any other), so what is scored is
what the endpoint's users get: its engine, its dtype, its limits.

``loom eval RECIPE --endpoint URL --model ID`` builds the run's tasks from its held-out documents (as the
stage does, the same files) and writes, under ``<run>/eval/endpoint/<model>/``, the harness's result and sample
files and ``scores.json``. The API key comes from the environment (``LOOM_API_KEY``), never the command line,
and is sent only as the request header: the harness records its model arguments, not the header.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from pipelines.artifacts import ENDPOINT_SCORES, DataOutputs, EndpointScores, EvalResults, EvalTaskInfo, ModelScores
from pipelines.eval.config import EvalConfig
from pipelines.eval.harness import run_tasks, score
from pipelines.runs import RunDir

API_KEY_ENV = "LOOM_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class EndpointError(RuntimeError):
    """The endpoint cannot be scored: unreachable, the key refused, the model not served."""


def endpoint_problems(url: str, model: str | None, ca_file: str | None, batch_size: int) -> list[str]:
    """Every problem with the arguments, before anything is sent: the key travels only over TLS (plain HTTP to
    this machine alone), and the URL carries no credentials of its own (it is printed and written)."""
    problems = []
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        problems.append(f"--endpoint: {url!r} is no URL; give its base, e.g. https://127.0.0.1:8000/v1")
    elif parts.scheme == "http" and parts.hostname not in LOOPBACK:
        problems.append(
            f"--endpoint: {url} is plain HTTP to another machine: the key would travel unencrypted; use https"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        problems.append(
            "--endpoint: give the URL without credentials, query or fragment (the key comes from LOOM_API_KEY)"
        )
    if parts.path.rstrip("/").endswith("/completions"):
        problems.append(
            f"--endpoint: give the API's base ({url.rstrip('/').removesuffix('/completions')}), not /completions"
        )
    if not model:
        problems.append("--model: name the served model to score (its id on the endpoint)")
    if ca_file and not Path(ca_file).is_file():
        problems.append(f"--ca-file: {ca_file} is no file")
    if batch_size < 1:
        problems.append(f"--batch-size: {batch_size} is below 1")
    return problems


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
    """One folder per served model id: its readable part, and a digest so that no id names another's folder
    (or, as ``..``, one above it)."""
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", model).strip("_")[:64] or "model"
    return EvalResults.at(run).endpoint_root / f"{readable}-{hashlib.sha256(model.encode()).hexdigest()[:8]}"


def check_endpoint(endpoint: Endpoint, timeout_s: float = 30) -> None:
    """One request before the tasks' hundreds: the endpoint answers, takes the key and serves the model."""
    import requests

    try:
        answer = requests.get(
            endpoint.url.rstrip("/") + "/models",
            headers={"Authorization": f"Bearer {endpoint.api_key}"},
            verify=endpoint.ca_file or True,
            timeout=timeout_s,
        )
    except requests.RequestException as error:
        raise EndpointError(f"cannot reach {endpoint.url}: {type(error).__name__}: {error}") from None
    if answer.status_code in (401, 403):
        raise EndpointError(f"{endpoint.url} refused the key in {API_KEY_ENV} ({answer.status_code})")
    if answer.status_code != 200:
        raise EndpointError(f"{endpoint.url}/models answered {answer.status_code}: is it the API's base (…/v1)?")
    try:
        served = [m["id"] for m in answer.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise EndpointError(f"{endpoint.url}/models did not answer an OpenAI model list") from None
    if endpoint.model not in served:
        raise EndpointError(
            f"{endpoint.url} serves no model {endpoint.model!r}; it serves: {', '.join(served) or 'none'}"
        )


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
    """The run's eval tasks through ``endpoint``; its scores and where they were written. Raises EndpointError
    when the endpoint cannot be scored (before any task is sent, or from the harness's failed requests)."""
    import requests

    data = DataOutputs.of(run)
    check_endpoint(endpoint)
    out = endpoint_dir(run, endpoint.model)
    shutil.rmtree(out, ignore_errors=True)
    tasks = run_tasks(data, config, out / "tasks", seed)
    model = load_endpoint(endpoint, data.tokenizer, data.seq_len, config, batch_size)
    harness = out / "harness"
    harness.mkdir(parents=True)
    try:
        scores = score(model, Path(endpoint.url), tasks, harness, seed)
    except requests.RequestException as error:  # after the harness's own retries: a 429 from a spent budget, a 5xx
        raise EndpointError(
            f"a request to {endpoint.url} failed after the harness's retries: {type(error).__name__}: {error} "
            "(a key's tokens per minute must hold the tasks' tokens)"
        ) from None
    scores = scores.model_copy(update={"path": f"{endpoint.url} model={endpoint.model}"})
    written = EndpointScores(
        endpoint=endpoint.url,
        model=endpoint.model,
        tasks={
            t.name: EvalTaskInfo(kind=t.kind, rows=t.rows, headline=t.headline, lower_is_better=t.lower_is_better)
            for t in tasks
        },
        scores=scores,
    )
    (out / ENDPOINT_SCORES).write_text(written.model_dump_json(indent=2) + "\n")
    return scores, out
