"""The sweep's early stopping: TPE + ASHA against random search + FIFO, same trial count, same data, one run.

Measures the optimizer steps all trials trained together and the best held-out loss reached.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.conftest import SMALL_MODEL, TINY

pytestmark = pytest.mark.benchmark
TRIALS, STEPS, REPORT_EVERY = 8, 16, 4
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
    rows = []
    for name, overrides in CONTENDERS.items():
        cfg = load_config(TINY, [*common, *overrides])
        start = time.perf_counter()
        result = run_tune(cfg.tune, cfg.train, run, cfg.seed)
        seconds = time.perf_counter() - start
        best = json.loads((run.stage_dir("tune") / "best.json").read_text())
        rows.append(
            {
                "sweep": name,
                "trial_steps": result.metrics["trial_steps"],
                "stopped_early": result.metrics["stopped_early"],
                "best_val_loss": round(best["best"]["val_loss"], 4),
                "best_lr": f"{best['best']['params']['train.lr']:.3g}",
                "seconds": round(seconds, 1),
            }
        )
        shutil.move(run.stage_dir("tune"), run.root / f"tune-{cfg.tune.search}-{cfg.tune.scheduler}")
    ray.shutdown()
    baseline, asha = rows
    assert baseline["stopped_early"] == 0 and baseline["trial_steps"] == TRIALS * STEPS
    record_benchmark(
        "tune_asha",
        rows,
        trials=TRIALS,
        steps_per_trial=STEPS,
        report_every=REPORT_EVERY,
        steps_ratio=round(asha["trial_steps"] / baseline["trial_steps"], 3),
        best_val_loss_difference=round(asha["best_val_loss"] - baseline["best_val_loss"], 4),
    )
