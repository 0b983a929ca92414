"""Benchmarks write their figures as JSON under bench-results/ and print a table."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.conftest import REPO_ROOT

T = TypeVar("T")
RESULTS = REPO_ROOT / "bench-results"
#: The benchmarks' model: bigger than the tiny recipe's, so that compute, not per-step or per-request
#: plumbing, is what is timed (a 4-layer, 256-wide Llama, ~3.7M parameters).
BENCH_MODEL = [
    "train.model.hidden_size=256",
    "train.model.num_layers=4",
    "train.model.num_heads=4",
    "train.model.num_kv_heads=4",
    "train.model.intermediate_size=1024",
]


def best_time(run: Callable[[], T], runs: int = 2) -> tuple[float, T]:
    """(seconds of the fastest of ``runs`` calls, that call's result): a one-off stall on 2 shared cores
    (a worker starting, a GC pause) lands in one run, not in the figure."""
    best: tuple[float, T] | None = None
    for _ in range(runs):
        start = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - start
        if best is None or seconds < best[0]:
            best = (seconds, result)
    return best


@pytest.fixture
def record_benchmark():
    def record(name: str, rows: list[dict], **extra) -> Path:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{name}.json"
        path.write_text(json.dumps({"benchmark": name, "rows": rows, **extra}, indent=2) + "\n")
        columns = list(rows[0])
        print(f"\n{name}")
        print(" | ".join(f"{c:>18}" for c in columns))
        for row in rows:
            print(" | ".join(f"{row[c]:>18.4g}" if isinstance(row[c], float) else f"{row[c]!s:>18}" for c in columns))
        for key, value in extra.items():
            print(f"{key}: {value}")
        return path

    return record
