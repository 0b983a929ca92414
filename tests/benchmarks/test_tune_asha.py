"""The sweep's early stopping: TPE + ASHA against random search + FIFO, same trial count, same data.

Measures the optimizer steps all trials trained together and the best held-out loss reached. The result is
statistical (which rates the searchers draw, which trials ASHA stops), so it is measured over SEEDS seeds,
both sweeps with each seed, and reported as the median and spread over the seeds.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.benchmarks.conftest import comparison
from tests.conftest import SMALL_MODEL, TINY

# Two sweeps for each of three seeds, ~6 minutes a sweep on 2 cores.
pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(5400)]
TRIALS, STEPS, REPORT_EVERY = 8, 16, 4
SEEDS = (0, 1, 2)
#: Wide on purpose: rates near 1e-4 barely learn in 16 steps and rates near 1 diverge, as in a first sweep.
SPACE = "{train.lr: {kind: loguniform, low: 1.0e-4, high: 1.0}}"
CONTENDERS = {
    "random + FIFO": ["tune.search=random", "tune.scheduler=fifo"],
    "TPE + ASHA": ["tune.search=tpe", "tune.scheduler=asha", f"tune.grace_period_steps={REPORT_EVERY}"],
}


def test_asha_with_tpe_against_random_search(tmp_path, record_benchmark):
    import ray

    from cluster.chain import run_stage
    from cluster.connect import connect
    from cluster.recipe import load_config
    from pipelines.runs import RunDir
    from tune.stage import run_tune

    common = [
        f"storage={tmp_path}",
        "run_name=asha",
        "data.max_documents=300",
        "data.vocab_size=1024",
        *SMALL_MODEL,
        f"train.log_every={REPORT_EVERY}",
        f"tune.num_trials={TRIALS}",
        f"tune.max_steps_per_trial={STEPS}",
        f"tune.space={SPACE}",
    ]
    base = load_config(TINY, common)
    connect(base.cluster)
    run_stage("data", base)
    run = RunDir(base.run_dir())
    rows, quantities = [], {}
    for seed in SEEDS:
        for name, overrides in CONTENDERS.items():
            cfg = load_config(TINY, [*common, *overrides, f"seed={seed}"])
            start = time.perf_counter()
            result = run_tune(cfg.tune, cfg.train, run, cfg.seed)
            seconds = time.perf_counter() - start
            best = json.loads((run.stage_dir("tune") / "best.json").read_text())
            rows.append(
                {
                    "seed": seed,
                    "sweep": name,
                    "trial_steps": result.metrics["trial_steps"],
                    "stopped_early": result.metrics["stopped_early"],
                    "best_val_loss": round(best["best"]["val_loss"], 4),
                    "best_lr": f"{best['best']['params']['train.lr']:.3g}",
                    "seconds": round(seconds, 1),
                }
            )
            for key in ("trial_steps", "best_val_loss", "seconds"):
                quantities.setdefault(f"{name} {key.replace('_', ' ')}", []).append(rows[-1][key])
            shutil.move(run.stage_dir("tune"), run.root / f"tune-{cfg.tune.search}-{cfg.tune.scheduler}-{seed}")
    ray.shutdown()
    for row in rows:
        if row["sweep"] == "random + FIFO":
            assert row["stopped_early"] == 0 and row["trial_steps"] == TRIALS * STEPS, row
    record_benchmark(
        "tune_asha",
        stage="tune",
        measure="TPE + ASHA vs random search + FIFO: optimizer steps of all trials, best held-out loss",
        runs_over="seeds",
        inputs={
            "seeds": list(SEEDS),
            "trials": TRIALS,
            "steps_per_trial": STEPS,
            "report_every": REPORT_EVERY,
            "space": SPACE,
            "contenders": {name: " ".join(overrides) for name, overrides in CONTENDERS.items()},
            "model": "the tests' small model",
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "trial steps, TPE + ASHA / random + FIFO",
                "optimizer steps of all trials, TPE + ASHA / random",
                quantities,
                "TPE + ASHA trial steps",
                "random + FIFO trial steps",
                better="lower",
            ),
            comparison(
                "best held-out loss, TPE + ASHA - random + FIFO",
                "best held-out loss, TPE + ASHA minus random",
                quantities,
                "TPE + ASHA best val loss",
                "random + FIFO best val loss",
                kind="difference",
                better="lower",
            ),
            comparison(
                "sweep seconds, TPE + ASHA / random + FIFO",
                "sweep wall seconds, TPE + ASHA / random",
                quantities,
                "TPE + ASHA seconds",
                "random + FIFO seconds",
                better="lower",
            ),
        ],  # fmt: skip
        rows=rows,
    )
