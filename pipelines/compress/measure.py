"""Scoring a model directory the way it would be served: held-out perplexity, weight bytes, and
generation speed at a fixed small load (one request at a time, greedy, a fixed number of new tokens).

A format the serving engine loads here is measured in vLLM (``probe.py``, in a process of its own so
the engine's memory and threads go with it); one it cannot load (bitsandbytes on CPU) is measured with
transformers and marked so. Perplexity is the exponent of the mean next-token loss over the same
held-out rows in both engines.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.compress.files import weight_bytes


@dataclass(frozen=True)
class Load:
    """The fixed load every candidate is timed under."""

    requests: int = 8
    prompt_tokens: int = 16
    new_tokens: int = 32


@dataclass
class Measurement:
    engine: str  # "vllm" or "transformers"
    perplexity: float
    weight_bytes: int
    tokens_per_s: float
    p50_latency_ms: float


@dataclass
class SpeculativeMeasurement:
    """A model generating with a draft model proposing ``num_speculative_tokens`` tokens per step (vLLM's
    draft-model method), at the same load as ``Measurement``."""

    num_speculative_tokens: int
    tokens_per_s: float
    p50_latency_ms: float
    acceptance_rate: float  # accepted draft tokens / proposed draft tokens
    mean_accepted_tokens: float  # accepted draft tokens per step
    draft_tokens: int


def held_out_rows(val_dir: Path, max_rows: int) -> list[list[int]]:
    """The first ``max_rows`` packed rows of the held-out shards, in file-name order (the same every call)."""
    import pyarrow.parquet as pq

    rows: list[list[int]] = []
    for path in sorted(Path(val_dir).glob("*.parquet")):
        rows += pq.read_table(path, columns=["input_ids"]).column("input_ids").to_pylist()
        if len(rows) >= max_rows:
            break
    if not rows:
        raise ValueError(f"no held-out rows in {val_dir}: the data stage wrote no validation split")
    return rows[:max_rows]


def _prompts(rows: list[list[int]], load: Load) -> list[list[int]]:
    return [rows[i % len(rows)][: load.prompt_tokens] for i in range(load.requests)]


def measure_transformers(model_dir: Path, rows: list[list[int]], load: Load) -> Measurement:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="cpu")
    model.eval()
    losses, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row], dtype=torch.long)
            losses += float(model(ids, labels=ids).loss) * (len(row) - 1)
            tokens += len(row) - 1
        latencies = []
        prompts = _prompts(rows, load)
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False)  # warm-up
        for prompt in prompts:
            start = time.perf_counter()
            model.generate(
                torch.tensor([prompt]), max_new_tokens=load.new_tokens, min_new_tokens=load.new_tokens, do_sample=False
            )
            latencies.append(time.perf_counter() - start)
    return Measurement(
        engine="transformers",
        perplexity=math.exp(min(losses / tokens, 50.0)),
        weight_bytes=weight_bytes(model_dir),
        tokens_per_s=load.new_tokens * len(latencies) / sum(latencies),
        p50_latency_ms=statistics.median(latencies) * 1000,
    )


def _die_with_parent() -> None:
    """In the child before it runs: the kernel kills it when its parent dies (Linux), so a trial Ray kills
    (its sweep's driver gone) takes its running engine with it instead of leaving it measuring alone."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _probe(request: dict, timeout_s: float) -> dict:
    """``python -m pipelines.compress.probe`` on ``request`` in a child process; its JSON answer."""
    with tempfile.TemporaryDirectory() as scratch:
        request_path, answer = Path(scratch) / "request.json", Path(scratch) / "answer.json"
        request_path.write_text(json.dumps(request))
        env = {
            **os.environ,
            # The engine in the probe's own process: no second interpreter to start (~30 s on 2 cores).
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            # vLLM on CPU otherwise reserves most of the machine's memory for its KV cache.
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        }
        done = subprocess.run(
            [sys.executable, "-m", "pipelines.compress.probe", str(request_path), str(answer)],
            env=env,
            preexec_fn=_die_with_parent,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if done.returncode != 0 or not answer.is_file():
            raise RuntimeError(
                f"vLLM could not measure {request['model']} (exit {done.returncode}): {done.stderr[-3000:]}"
            )
        return json.loads(answer.read_text())


def measure_vllm(model_dir: Path, rows: list[list[int]], load: Load, timeout_s: float = 900) -> Measurement:
    """vLLM's measurement of ``model_dir``, in a child process."""
    result = _probe({"model": str(model_dir), "rows": rows, "load": asdict(load)}, timeout_s)
    return Measurement(engine="vllm", weight_bytes=weight_bytes(model_dir), **result)


def measure_speculative(
    model_dir: Path,
    draft_dir: Path,
    num_speculative_tokens: int,
    rows: list[list[int]],
    load: Load,
    timeout_s: float = 900,
) -> SpeculativeMeasurement:
    """vLLM generating with ``model_dir`` and ``draft_dir`` as its draft (same vocabulary), in a child process."""
    request = {
        "model": str(model_dir),
        "rows": rows,
        "load": asdict(load),
        "draft": str(draft_dir),
        "num_speculative_tokens": num_speculative_tokens,
    }
    return SpeculativeMeasurement(num_speculative_tokens=num_speculative_tokens, **_probe(request, timeout_s))
