"""A fixed-concurrency load on an OpenAI-compatible endpoint: output tokens/s, latency and time to first token.

Streaming completions, so the first token's arrival is seen; ``ignore_eos`` (a vLLM extension) makes
every request produce exactly ``max_tokens`` tokens, so two servers are compared on the same work.
Bounded by a request count and a wall-clock limit; meant for loopback endpoints.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LoadResult:
    requests: int
    failed: int
    output_tokens: int
    seconds: float
    tokens_per_s: float
    latency_p50_s: float
    latency_p99_s: float
    ttft_p50_s: float
    ttft_p99_s: float

    def as_row(self) -> dict[str, float | int]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


async def _one(client, url: str, payload: dict, headers: dict) -> tuple[float, float, int]:
    """(latency, time to first token, tokens) of one streamed completion."""
    started = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url, json=payload, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and first is None:
                first = time.perf_counter() - started
    return time.perf_counter() - started, first if first is not None else float("nan"), tokens


async def _run(
    base_url: str, model: str, prompts: list[str], concurrency: int, requests: int, max_tokens: int,
    api_key: str | None, time_limit_s: float,
) -> LoadResult:  # fmt: skip
    import httpx

    url = base_url.rstrip("/") + "/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    done: list[tuple[float, float, int]] = []
    failed = 0
    deadline = time.perf_counter() + time_limit_s

    async def worker(client) -> None:
        nonlocal failed
        while time.perf_counter() < deadline:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            payload = {
                "model": model,
                "prompt": prompts[i % len(prompts)],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
                "ignore_eos": True,
            }
            try:
                done.append(await _one(client, url, payload, headers))
            except Exception:
                failed += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    latency = np.array([d[0] for d in done]) if done else np.array([np.nan])
    ttft = np.array([d[1] for d in done]) if done else np.array([np.nan])
    tokens = sum(d[2] for d in done)
    return LoadResult(
        requests=len(done),
        failed=failed,
        output_tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds,
        latency_p50_s=float(np.percentile(latency, 50)),
        latency_p99_s=float(np.percentile(latency, 99)),
        ttft_p50_s=float(np.nanpercentile(ttft, 50)),
        ttft_p99_s=float(np.nanpercentile(ttft, 99)),
    )


def run_load(
    base_url: str,
    model: str,
    prompts: list[str],
    *,
    concurrency: int,
    requests: int,
    max_tokens: int,
    api_key: str | None = None,
    time_limit_s: float = 300,
) -> LoadResult:
    """Send ``requests`` streamed completions, ``concurrency`` at a time, stopping early at ``time_limit_s``."""
    return asyncio.run(_run(base_url, model, prompts, concurrency, requests, max_tokens, api_key, time_limit_s))
