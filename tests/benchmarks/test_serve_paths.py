"""The serving paths side by side, one model and one streamed load: Loom's path (Serve's proxy -> Loom's ingress ->
the LLMServer replica), the same with two ingress replicas, Ray Serve LLM's direct streaming (HAProxy -> the
LLMServer replica serving HTTP itself; Ray's stock path, without Loom's checks, which that mode cannot host in an
ingress), and bare vLLM's OpenAI server. For each: output tokens/s, time to first token p50/p99, and CPU-seconds
per 1,000 output tokens of each component (processes grouped by their title), over three rounds in rotated
order."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import psutil
import pytest

from tests.benchmarks.conftest import comparison, side_by_side
from tests.benchmarks.test_serve_load import (  # noqa: F401 (model_dir: a fixture)
    CONCURRENCY,
    MAX_MODEL_LEN,
    MAX_TOKENS,
    REQUESTS,
    bench_app,
    model_dir,
    prompts,
    vllm_server,
)
from tests.conftest import REPO_ROOT, free_port

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(3600)]
KEY = "loom-bench-paths-key-0001"
#: Process title (Ray's and vLLM's setproctitle, or the command line) -> component; first match wins.
COMPONENTS = [
    ("haproxy", "HAProxy"),
    ("ProxyActor", "Serve HTTP proxy"),
    ("LoomIngress", "ingress"),
    ("OpenAiIngress", "ingress"),
    ("LLMRouter", "LLM router"),
    ("LLMServer", "LLMServer replica"),
    ("EngineCore", "vLLM engine core"),
    ("vllm.entrypoints", "vLLM API server"),
]


def component(process: psutil.Process) -> str | None:
    try:
        title = " ".join(process.cmdline()) or process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    for marker, name in COMPONENTS:
        if marker in title:
            return name
    if "ray" in title or "gcs_server" in title or "raylet" in title:
        return "Ray (other)"
    return None


def cpu_by_process() -> dict[int, tuple[str, float]]:
    """Every process's component and CPU-seconds so far; the benchmark's own process (the load) is left out."""
    seen = {}
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        name = component(process)
        if name is None:
            continue
        try:
            times = process.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        seen[process.pid] = (name, times.user + times.system)
    return seen


def measured_load(base_url: str, texts: list[str], api_key: str | None) -> dict[str, float]:
    """A warm-up, then the load; its figures and each component's CPU-seconds per 1,000 output tokens."""
    from serve.loadtest import run_load

    run_load(
        base_url,
        "bench",
        texts[:CONCURRENCY],
        concurrency=CONCURRENCY,
        requests=CONCURRENCY,
        max_tokens=8,
        api_key=api_key,
    )
    before = cpu_by_process()
    result = run_load(
        base_url,
        "bench",
        texts,
        concurrency=CONCURRENCY,
        requests=REQUESTS,
        max_tokens=MAX_TOKENS,
        time_limit_s=300,
        api_key=api_key,
    )
    after = cpu_by_process()
    if result.failed or result.output_tokens != REQUESTS * MAX_TOKENS:
        raise RuntimeError(f"{base_url}: {result.failed} failed, {result.output_tokens} tokens")
    spent: dict[str, float] = defaultdict(float)
    for pid, (name, seconds) in after.items():
        spent[name] += seconds - before.get(pid, (name, 0.0))[1]
    figures = {
        "tokens/s": result.tokens_per_s,
        "ttft p50 s": result.ttft_p50_s,
        "ttft p99 s": result.ttft_p99_s,
    }
    per_thousand = 1000 / result.output_tokens
    figures.update({f"cpu s per 1k tokens: {name}": seconds * per_thousand for name, seconds in spent.items()})
    figures["cpu s per 1k tokens: all"] = sum(spent.values()) * per_thousand
    return figures


@contextmanager
def loom(model: Path, ingress_replicas: int, keys: Path) -> Iterator[tuple[str, str | None]]:
    engine = {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "max_num_seqs": CONCURRENCY}
    # Every check runs (key, rate, price, budget, guard, audit off: no run folder); none refuses.
    protection = {
        "api_keys_file": str(keys),
        "max_tokens": MAX_TOKENS,
        "requests_per_minute": 60_000,
        "burst": 1000,
        "tokens_per_minute": 10_000_000,
        "max_request_tokens": 100_000,
        # One key alone: the slot kept for other keys would only idle (a fairness policy, not the path).
        "reserved_engine_slots": 0,
    }
    with bench_app(
        model,
        {"cpus_per_replica": os.cpu_count(), "engine": engine},
        protection,
        num_cpus=3 * (os.cpu_count() or 2),  # logical: the replica, its engine, 1-2 ingresses
        ingress_replicas=ingress_replicas,
    ) as url:
        yield url, KEY


@contextmanager
def direct_streaming(model: Path) -> Iterator[tuple[str, str | None]]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tests.benchmarks.direct_streaming",
        str(model),
        str(port),
        str(MAX_MODEL_LEN),
        str(CONCURRENCY),
    ]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        last = ""
        for line in process.stdout:  # Ray's own lines, then ours
            if line.strip() == "ready":
                break
            last = line
        else:
            raise RuntimeError(f"direct streaming did not start (exit {process.wait(timeout=60)}): {last[:300]}")
        yield f"http://127.0.0.1:{port}/v1", None
    finally:
        process.stdin.close()
        process.wait(timeout=120)


@contextmanager
def bare_vllm(model: Path) -> Iterator[tuple[str, str | None]]:
    with vllm_server(model) as url:
        yield url, None


def path(server: Callable[[], object], texts: list[str]) -> dict[str, float]:
    with server() as (url, api_key):
        return measured_load(url, texts, api_key)


def test_serving_paths_side_by_side(model_dir, record_benchmark, tmp_path):  # noqa: F811
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    texts = prompts(REQUESTS)
    runs = side_by_side(
        {
            "Loom": partial(path, partial(loom, model_dir, 1, keys), texts),
            "Loom, 2 ingress replicas": partial(path, partial(loom, model_dir, 2, keys), texts),
            "direct streaming": partial(path, partial(direct_streaming, model_dir), texts),
            "bare vLLM": partial(path, partial(bare_vllm, model_dir), texts),
        }
    )
    quantities = {}
    for server, results in runs.items():
        for field in sorted({f for r in results for f in r}):
            quantities[f"{server}: {field}"] = [r.get(field, 0.0) for r in results]
    comparisons = []
    for server in ("Loom", "Loom, 2 ingress replicas", "direct streaming"):
        comparisons.append(
            comparison(
                f"output tokens/s, {server} vs bare vLLM",
                f"output tokens/s, {server} vs vLLM's own server (goal >= 0.8)",
                quantities,
                f"{server}: tokens/s",
                "bare vLLM: tokens/s",
            )
        )
        comparisons.append(
            comparison(
                f"first-token p50, {server} - bare vLLM",
                f"time to first token p50, {server} minus vLLM's own server, seconds (goal <= 0.020)",
                quantities,
                f"{server}: ttft p50 s",
                "bare vLLM: ttft p50 s",
                kind="difference",
                better="lower",
            )
        )
    record_benchmark(
        "serve_paths",
        stage="serve",
        measure="streamed completions at fixed concurrency through each serving path: tokens/s, first-token "
        "latency, CPU-seconds per 1,000 output tokens by component",
        inputs={
            "model": "4 layers x 256 wide Llama (~3.7M parameters), float32, random weights",
            "concurrency": CONCURRENCY,
            "requests_per_run": REQUESTS,
            "max_tokens": MAX_TOKENS,
            "paths": {
                "Loom": "Serve HTTP proxy -> LoomIngress (keys, price, budget, engine slots with none reserved: one "
                "key) -> LLMServer (vLLM)",
                "Loom, 2 ingress replicas": "the same, serve.ingress_replicas: 2",
                "direct streaming": "RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING + RAY_SERVE_ENABLE_HA_PROXY: HAProxy -> "
                "LLMServer serving HTTP (Ray's stock path, no Loom checks)",
                "bare vLLM": "vllm.entrypoints.openai.api_server, same engine settings",
            },
        },
        quantities=quantities,
        comparisons=comparisons,
    )
