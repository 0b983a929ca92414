"""Recovery: kill -9 on one of 2 training workers; seconds until training progresses again, steps redone."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY
from tests.training import fit, killer, reported_steps, resume_config

pytestmark = pytest.mark.benchmark
CHECKPOINT_EVERY, KILL_AFTER, STEPS = 4, 6, 12


def test_recovery_after_a_killed_worker(tmp_path, record_benchmark):
    import ray

    from cluster.chain import run_stage
    from cluster.connect import connect
    from cluster.recipe import load_config

    cfg = load_config(
        TINY, [f"storage={tmp_path}", "run_name=recovery", "data.max_documents=120", "data.vocab_size=1024"]
    )
    connect(cfg.cluster)
    run_stage("data", cfg)
    config = resume_config(cfg.train, STEPS, CHECKPOINT_EVERY)
    killed: dict[str, float] = {}
    result, history = fit(config, cfg, tmp_path, "killed", during=killer(KILL_AFTER, killed))
    ray.shutdown()
    assert killed and result.metrics["step"] == STEPS
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    after = [row for row in rows if row["reported_at"] > killed["at"] and not row.get("final")]
    first_after = after[0]
    steps_redone = int(killed["step"]) - CHECKPOINT_EVERY
    assert first_after["step"] == CHECKPOINT_EVERY + 1
    record_benchmark(
        "recovery",
        [
            {
                "killed_after_step": int(killed["step"]),
                "resumed_from_step": CHECKPOINT_EVERY,
                "seconds_to_progress": round(first_after["reported_at"] - killed["at"], 1),
                "steps_redone": steps_redone,
                "steps_skipped": len(set(range(1, STEPS + 1)) - set(reported_steps(history))),
            }
        ],
        checkpoint_every=CHECKPOINT_EVERY,
        workers=config.num_workers,
    )
