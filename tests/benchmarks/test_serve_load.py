"""Serving under a fixed-concurrency load: Loom's Ray Serve endpoint vs the same vLLM engine behind its own
OpenAI server vs Hugging Face ``generate``, on the same model and prompts, in one run: three rounds, each
starting every server in turn (order rotated), warming it up and timing one load of REQUESTS requests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest

from tests.benchmarks.conftest import BENCH_MODEL, comparison, side_by_side
from tests.conftest import TINY, free_port

# Three rounds of five servers, each started afresh: beyond the suite's 20-minute default.
pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(3600)]
CONCURRENCY, REQUESTS, MAX_TOKENS, MAX_MODEL_LEN = 8, 96, 64, 512
#: Loom's endpoint is also measured with streamed chunks gathered this long (the default is 50 ms).
GATHERED_MS = 200.0
SERVE_MODEL = [*BENCH_MODEL, f"train.model.max_position_embeddings={MAX_MODEL_LEN}"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A randomly initialised Llama with a BPE tokenizer trained on stdlib sources (no Ray, no download)."""
    from cluster.recipe import load_config
    from pipelines.data.readers import stdlib_files
    from pipelines.model.llama import build_llama, export_hf
    from pipelines.model.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("bench-model")
    cfg = load_config(TINY, SERVE_MODEL)
    texts = (Path(path).read_text(errors="replace") for path in stdlib_files()[:200])
    tokenizer = train_bpe(texts, cfg.data.vocab_size, root / "tokenizer")
    model = build_llama(cfg.train.model, tokenizer, seed=0)
    return export_hf(model, model.state_dict(), tokenizer, root / "model")


def prompts(count: int) -> list[str]:
    from pipelines.data.readers import stdlib_files

    texts = (Path(path).read_text(errors="replace")[:400] for path in stdlib_files()[200:])
    return [text for text in texts if text.strip()][:count]  # an empty prompt is a (correct) 400


def wait_healthy(url: str, process: subprocess.Popen | None = None, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not healthy after {timeout_s} s")


def load(base_url: str, model: str, texts: list[str]):
    from serve.loadtest import run_load

    run_load(base_url, model, texts[:CONCURRENCY], concurrency=CONCURRENCY, requests=CONCURRENCY, max_tokens=8)
    result = run_load(
        base_url, model, texts, concurrency=CONCURRENCY, requests=REQUESTS, max_tokens=MAX_TOKENS, time_limit_s=300
    )
    assert result.failed == 0, result.failed
    assert result.output_tokens == REQUESTS * MAX_TOKENS, result.output_tokens
    return result


@contextmanager
def bench_app(
    model_dir: Path,
    model: dict,
    protection: dict,
    *,
    num_cpus: int | None = None,
    build: Callable | None = None,
    **serve_fields,
) -> Iterator[str]:
    """Loom's application serving ``model_dir`` as "bench" on loopback, on an embedded Ray of ``num_cpus`` logical
    CPUs (default: twice the cores, since a vLLM replica reserves its own and its engine's); ``model`` and ``protection`` are the recipe's fields for them, ``build(config)``
    another application on the same config. Yields the base URL; Serve and Ray are shut down after."""
    import ray
    from ray import serve

    from cluster.config import ClusterConfig
    from cluster.connect import connect
    from serve.app import ServeAppArgs, build_app
    from serve.config import ServeConfig

    port = free_port()
    config = ServeConfig.model_validate(
        {
            "models": {"bench": {"source": str(model_dir), **model}},
            "protection": {"api_keys_env": None, **protection},
            "port": port,
            **serve_fields,
        }
    )
    connect(ClusterConfig(num_cpus=num_cpus or 2 * (os.cpu_count() or 2)))
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        if build is None:
            args = ServeAppArgs(serve_config=config, model_sources={"bench": str(model_dir)})
            app = build_app(args.model_dump(mode="json"))
        else:
            app = build(config)
        serve.run(app, name="bench", route_prefix="/")
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        serve.shutdown()
        ray.shutdown()


def _stock_app(model_dir: Path, config):
    """``ray.serve.llm.build_openai_app`` on the LLMConfig Loom would give, with Ray's own LLMServer too (its
    batcher holds the first chunk for the interval)."""
    from ray.serve.llm import build_openai_app

    from serve.app import llm_config

    stock_config = llm_config("bench", config.models["bench"], str(model_dir)).model_copy(update={"server_cls": None})
    return build_openai_app({"llm_configs": [stock_config]})


def serve_endpoint(
    model_dir: Path, texts: list[str], stock_ingress: bool = False, stream_batching_ms: float | None = None
):
    """Loom's application (``stream_batching_ms`` unset: the config's default); with ``stock_ingress``,
    ``ray.serve.llm.build_openai_app`` on the same LLMConfig (no keys, limits or Loom metrics), to tell
    the ingress's share of the cost from Serve's."""
    model = {
        "cpus_per_replica": os.cpu_count(),
        "engine": {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "max_num_seqs": CONCURRENCY},
        **({"stream_batching_ms": stream_batching_ms} if stream_batching_ms is not None else {}),
    }
    # Limits high enough that every round passes: the checks still run, none refuses.
    protection = {"max_tokens": MAX_TOKENS, "requests_per_minute": 60_000, "burst": 1000}
    build = partial(_stock_app, model_dir) if stock_ingress else None
    with bench_app(model_dir, model, protection, build=build) as url:
        return load(url, "bench", texts)


@contextmanager
def vllm_server(model_dir: Path) -> Iterator[str]:
    """vLLM's own OpenAI server on the model, with the engine settings Loom's endpoints get here; its base URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", str(CONCURRENCY),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", process)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait(timeout=60)


def plain_vllm(model_dir: Path, texts: list[str]):
    with vllm_server(model_dir) as url:
        return load(url, "bench", texts)


def hf_generate(model_dir: Path, texts: list[str], batches: int = 3) -> dict[str, float]:
    """Batches of CONCURRENCY prompts through ``generate`` (left padding), each to exactly MAX_TOKENS tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    latencies, tokens = [], 0
    started = time.perf_counter()
    for b in range(batches):
        batch = tokenizer(texts[b * CONCURRENCY : (b + 1) * CONCURRENCY], return_tensors="pt", padding=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS, do_sample=False)
        latencies.append(time.perf_counter() - t0)
        tokens += (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    seconds = time.perf_counter() - started
    return {"requests": batches * CONCURRENCY, "tokens_per_s": tokens / seconds, "latency_p50_s": sorted(latencies)[1]}


def test_serve_throughput_against_plain_vllm_and_hf_generate(model_dir, record_benchmark):
    texts = prompts(REQUESTS)
    runs = side_by_side(
        {
            "Ray Serve": partial(serve_endpoint, model_dir, texts),
            "Ray Serve gathered": partial(serve_endpoint, model_dir, texts, stream_batching_ms=GATHERED_MS),
            "Serve stock app": partial(serve_endpoint, model_dir, texts, stock_ingress=True),
            "vLLM server": partial(plain_vllm, model_dir, texts),
            "HF generate": partial(hf_generate, model_dir, texts),
        }
    )
    quantities = {}
    for server, results in runs.items():
        if server == "HF generate":  # generate() answers a whole batch at once: no per-request latency
            quantities["HF generate tokens/s"] = [r["tokens_per_s"] for r in results]
            quantities["HF generate batch p50 s"] = [r["latency_p50_s"] for r in results]
            continue
        for field in ("tokens_per_s", "latency_p50_s", "latency_p99_s", "ttft_p50_s", "ttft_p99_s"):
            label = field.replace("tokens_per_s", "tokens/s").replace("_s", " s").replace("_", " ")
            quantities[f"{server} {label}"] = [getattr(r, field) for r in results]
    record_benchmark(
        "serve_load",
        stage="serve",
        measure="streamed completions at fixed concurrency: output tokens/s and latency",
        inputs={
            "model": "4 layers x 256 wide Llama (~3.7M parameters), float32, random weights",
            "concurrency": CONCURRENCY,
            "requests_per_run": REQUESTS,
            "max_tokens": MAX_TOKENS,
            "max_model_len": MAX_MODEL_LEN,
            "servers": {
                "Ray Serve": "Loom's application (default stream_batching_ms) + vLLM",
                "Ray Serve gathered": f"the same with stream_batching_ms={GATHERED_MS:g}",
                "Serve stock app": "ray.serve.llm.build_openai_app on the same LLMConfig",
                "vLLM server": "vllm.entrypoints.openai.api_server, same engine settings",
                "HF generate": f"transformers generate, 3 batches of {CONCURRENCY}, left padding",
            },
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "output tokens/s, Ray Serve vs vLLM server",
                "output tokens/s, Loom on Ray Serve vs vLLM's server",
                quantities,
                "Ray Serve tokens/s",
                "vLLM server tokens/s",
            ),
            comparison(
                "output tokens/s, gathered vs vLLM server",
                f"output tokens/s, stream_batching_ms={GATHERED_MS:g} vs vLLM's server",
                quantities,
                "Ray Serve gathered tokens/s",
                "vLLM server tokens/s",
            ),
            comparison(
                "output tokens/s, stock Serve app vs vLLM server",
                "output tokens/s, Ray's stock OpenAI app vs vLLM's server",
                quantities,
                "Serve stock app tokens/s",
                "vLLM server tokens/s",
            ),
            comparison(
                "p50 latency, Ray Serve vs vLLM server",
                "p50 request latency, Ray Serve vs vLLM's server",
                quantities,
                "Ray Serve latency p50 s",
                "vLLM server latency p50 s",
                better="lower",
            ),
            comparison(
                "output tokens/s, vLLM server vs HF generate",
                "output tokens/s, vLLM's server vs HF generate",
                quantities,
                "vLLM server tokens/s",
                "HF generate tokens/s",
            ),
        ],  # fmt: skip
    )
