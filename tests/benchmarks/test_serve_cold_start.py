"""Scale to zero: a model with ``min_replicas: 0`` gives its replica back when idle; the first request after
waits for a cold start. Measured side by side with a warm request to the same endpoint, in one deployment:
three rounds, each waiting for the model to reach zero replicas, then timing its first request (cold) and the
next one (warm)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.benchmarks.conftest import comparison
from tests.benchmarks.test_serve_load import MAX_MODEL_LEN, bench_app, model_dir  # noqa: F401 (model_dir: a fixture)
from tests.helpers import wait_for

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(3600)]
KEY = "loom-bench-cold-key-0001"
ROUNDS, TOKENS = 3, 16


def _replicas(app: str) -> int:
    from ray import serve

    deployments = serve.status().applications[app].deployments
    return sum(
        count
        for name, deployment in deployments.items()
        if "LLMServer" in name  # LoomLLMServer:<model>, not the ingress
        for state, count in deployment.replica_states.items()
        if str(state).endswith("RUNNING")
    )


def _ask(url: str) -> float:
    started = time.perf_counter()
    answer = httpx.post(
        url,
        json={"model": "bench", "prompt": "def fibonacci(n):", "max_tokens": TOKENS, "ignore_eos": True},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=600,
    )
    if answer.status_code != 200:
        raise RuntimeError(f"{answer.status_code}: {answer.text[:300]}")
    return time.perf_counter() - started


def test_a_model_scaled_to_zero_answers_its_first_request_after_a_cold_start(
    model_dir,  # noqa: F811
    record_benchmark,
    tmp_path: Path,
):
    keys = tmp_path / "keys"
    keys.write_text(f"{KEY}\n")
    model = {
        "engine": {"dtype": "float32", "max_model_len": MAX_MODEL_LEN},
        "autoscaling": {
            "min_replicas": 0,
            "max_replicas": 1,
            "upscale_delay_s": 0,
            "downscale_delay_s": 5,
            "metrics_interval_s": 0.5,
            "look_back_period_s": 2,
        },
    }
    cold, warm = [], []
    with bench_app(model_dir, model, {"api_keys_file": str(keys)}) as base:
        url = f"{base}/completions"
        for _ in range(ROUNDS):
            wait_for(lambda: _replicas("bench") == 0, 300, "the idle model to reach zero replicas")
            cold.append(_ask(url))
            warm.append(_ask(url))
    quantities = {"first request after zero replicas s": cold, "next request s": warm}
    record_benchmark(
        "serve_cold_start",
        stage="serve",
        measure="seconds from a request to a model at zero replicas to its answer, against the next request",
        inputs={
            "model": "4 layers x 256 wide Llama (~3.7M parameters), float32, random weights, torch.compile on",
            "request": f"one completion of {TOKENS} tokens",
            "autoscaling": "min_replicas 0, max_replicas 1, downscale_delay_s 5",
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "cold start",
                "seconds from the first request to a model at zero replicas to its answer",
                quantities,
                "first request after zero replicas s",
                better="lower",
            ),
            comparison(
                "cold / warm request",
                "the first request's latency over the next one's",
                quantities,
                "first request after zero replicas s",
                "next request s",
                better="lower",
            ),
        ],
    )
