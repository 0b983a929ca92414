"""Two keys on one replica: one floods within its budget with long requests, the other sends short ones. The light
key's p99 latency under the flood, as a multiple of its own unloaded p99, with fair scheduling (vLLM's priority
policy, each request's priority from its caller's tokens in flight) and with first come, first served, side by
side: three rounds, each deploying both (order rotated)."""

from __future__ import annotations

import concurrent.futures
import os
import statistics
import threading
import time
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.benchmarks.conftest import comparison, side_by_side
from tests.benchmarks.test_serve_load import (  # noqa: F401 (model_dir: a fixture)
    MAX_MODEL_LEN,
    bench_app,
    model_dir,
    prompts,
)

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(3600)]
HEAVY, LIGHT = "loom-bench-heavy-key-0001", "loom-bench-light-key-0002"
#: The engine runs this many sequences at once; the flood keeps twice as many requests in flight, so it queues.
MAX_NUM_SEQS, FLOOD_CONCURRENCY, FLOOD_TOKENS = 4, 8, 64
LIGHT_REQUESTS, LIGHT_TOKENS = 30, 4


def _ask(http: httpx.Client, url: str, key: str, prompt: str, tokens: int) -> float:
    started = time.perf_counter()
    answer = http.post(
        url,
        json={"model": "bench", "prompt": prompt, "max_tokens": tokens, "ignore_eos": True},
        headers={"Authorization": f"Bearer {key}"},
    )
    if answer.status_code != 200:
        raise RuntimeError(f"{answer.status_code}: {answer.text[:300]}")
    return time.perf_counter() - started


def _light_p99(http: httpx.Client, url: str, texts: list[str]) -> float:
    latencies = [_ask(http, url, LIGHT, texts[i % len(texts)][:80], LIGHT_TOKENS) for i in range(LIGHT_REQUESTS)]
    return float(np.percentile(latencies, 99))


def fairness(model: Path, texts: list[str], scheduling: str, keys_file: Path) -> dict[str, float]:
    """Deploy Loom's endpoint with ``scheduling``; the light key's p99 alone, then under the heavy key's flood."""
    engine = {
        "dtype": "float32",
        "max_model_len": MAX_MODEL_LEN,
        "max_num_seqs": MAX_NUM_SEQS,
        "scheduling": scheduling,
    }
    protection = {
        "api_keys_file": str(keys_file),
        "max_tokens": FLOOD_TOKENS,
        "requests_per_minute": 60_000,
        "burst": 1000,
        "tokens_per_minute": 10_000_000,  # the flood stays within its budget: the engine is what it fills
        "max_request_tokens": 100_000,
    }
    stop = threading.Event()
    with bench_app(model, {"cpus_per_replica": os.cpu_count(), "engine": engine}, protection) as base:
        url = f"{base}/completions"
        try:
            with httpx.Client(timeout=300) as http:
                for _ in range(3):  # warm-up
                    _ask(http, url, LIGHT, texts[0][:80], LIGHT_TOKENS)
                alone = _light_p99(http, url, texts)

                def flood(worker: int) -> int:
                    sent = 0
                    with httpx.Client(timeout=300) as own:
                        while not stop.is_set():
                            _ask(own, url, HEAVY, texts[(worker + sent) % len(texts)], FLOOD_TOKENS)
                            sent += 1
                    return sent

                with concurrent.futures.ThreadPoolExecutor(FLOOD_CONCURRENCY) as pool:
                    flooding = [pool.submit(flood, worker) for worker in range(FLOOD_CONCURRENCY)]
                    time.sleep(5)  # the flood fills the engine and its queue
                    loaded = _light_p99(http, url, texts)
                    stop.set()
                    flood_requests = sum(f.result(timeout=600) for f in flooding)
        finally:
            stop.set()
    return {"alone_p99_s": alone, "loaded_p99_s": loaded, "slowdown": loaded / alone, "flood": flood_requests}


def test_a_flooding_key_does_not_starve_another(model_dir, record_benchmark, tmp_path):  # noqa: F811
    keys = tmp_path / "keys"
    keys.write_text(f"{HEAVY}\n{LIGHT}\n")
    texts = prompts(32)
    runs = side_by_side(
        {
            "fair": partial(fairness, model_dir, texts, "fair", keys),
            "fcfs": partial(fairness, model_dir, texts, "fcfs", keys),
        }
    )
    quantities = {}
    for scheduling, results in runs.items():
        quantities[f"{scheduling}: light key p99 alone s"] = [r["alone_p99_s"] for r in results]
        quantities[f"{scheduling}: light key p99 under the flood s"] = [r["loaded_p99_s"] for r in results]
        quantities[f"{scheduling}: slowdown"] = [r["slowdown"] for r in results]
        quantities[f"{scheduling}: flood requests"] = [float(r["flood"]) for r in results]
    record_benchmark(
        "serve_fairness",
        stage="serve",
        measure="a light key's p99 latency while another key floods, as a multiple of its p99 alone",
        inputs={
            "model": "4 layers x 256 wide Llama (~3.7M parameters), float32, random weights",
            "max_num_seqs": MAX_NUM_SEQS,
            "flood": f"{FLOOD_CONCURRENCY} concurrent requests of {FLOOD_TOKENS} tokens, one key, within its budget",
            "light": f"{LIGHT_REQUESTS} sequential requests of {LIGHT_TOKENS} tokens, another key",
            "goal": "light key's p99 under the flood within 3x its unloaded p99",
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "light key's p99 under a flood / alone, fair scheduling",
                "a light key's p99 while another key floods / its p99 alone, fair scheduling (goal <= 3)",
                quantities,
                "fair: slowdown",
                better="lower",
            ),
            comparison(
                "fair slowdown / first-come-first-served slowdown",
                "the light key's slowdown under the flood, fair scheduling / first come first served",
                quantities,
                "fair: slowdown",
                "fcfs: slowdown",
                better="lower",
            ),
        ],
    )
    assert statistics.median(quantities["fair: flood requests"]) > 0
