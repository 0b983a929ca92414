"""What the eval stage costs on the tiny recipe, as the demo runs it: the trained model and each compressed
variant on the front, every task built from the held-out documents, scored by lm-evaluation-harness. The chain
up to compress runs once; the eval stage then runs RUNS times from scratch on it (``--force``)."""

from __future__ import annotations

import time

import pytest

from tests.benchmarks.conftest import RUNS, comparison
from tests.conftest import TINY

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(3600)]


def test_eval_stage_seconds_on_the_tiny_recipe(tmp_path, record_benchmark):
    import ray

    from cluster.chain import run_stage
    from cluster.connect import connect
    from cluster.recipe import load_config
    from pipelines.artifacts import EvalResults
    from pipelines.runs import RunDir

    cfg = load_config(TINY, [f"storage={tmp_path}", "run_name=eval-bench"])
    connect(cfg.cluster)
    try:
        for stage in ("data", "tune", "train", "compress"):
            run_stage(stage, cfg)
        seconds, stage_seconds, models, rows = [], [], [], []
        for _ in range(RUNS):
            start = time.perf_counter()
            record = run_stage("eval", cfg, force=True)
            seconds.append(time.perf_counter() - start)
            stage_seconds.append(float(record["metrics"]["seconds"]))
            summary = EvalResults.of(RunDir(cfg.run_dir())).summary()
            models.append(float(record["metrics"]["models_scored"]))
            rows.append(float(sum(info.rows for info in summary.tasks.values())))
    finally:
        ray.shutdown()
    quantities = {
        "eval stage seconds": seconds,
        "scoring seconds (the stage's own figure)": stage_seconds,
        "seconds per model scored": [s / m for s, m in zip(seconds, models, strict=True)],
        "models scored": models,
        "task rows per model": rows,
    }
    record_benchmark(
        "eval_cost",
        stage="eval",
        measure="the eval stage on the tiny recipe: the trained model and the front's variants, every task",
        inputs={
            "recipe": TINY.name,
            "tasks": list(cfg.eval.tasks),
            "documents_per_source": cfg.eval.documents,
            "batch_size": cfg.eval.batch_size,
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "eval stage seconds",
                "the eval stage's seconds on the tiny recipe, every model and task (goal: about a minute)",
                quantities,
                "eval stage seconds",
                better="lower",
            ),
            comparison(
                "seconds per model scored",
                "the eval stage's seconds per model it scored",
                quantities,
                "seconds per model scored",
                better="lower",
            ),
        ],
    )
