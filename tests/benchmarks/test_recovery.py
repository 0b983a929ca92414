"""Recovery: kill -9 on one of 2 training workers; seconds until training progresses again, steps redone.
Three runs on the same data, each its own training run killed after the same step."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.conftest import RUNS, comparison
from tests.conftest import TINY
from tests.training import (
    fit,
    killer,
    lost_and_repeated,
    planned_rows,
    reported_steps,
    resume_config,
    sequence_accounts,
    trained_rows,
)

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(2400)]
CHECKPOINT_EVERY, KILL_AFTER, STEPS = 4, 6, 12
#: Where the seconds from the kill to the next reported step go, in order (they add up to it).
PHASES = (
    "detection and group restart s",  # the kill -> the new group's workers enter the training function
    "engine rebuild s",  # model, optimizer and deepspeed.initialize
    "checkpoint load s",  # engine.load_checkpoint (and re-sharding, after a resize)
    "first batch s",  # the data stream started again and read up to the position
    "first step and report s",  # forward, backward, optimizer step, the report reaching the driver
)


def recovery_phases(first_report: dict, killed_at: float) -> dict[str, float]:
    """The first report after a restart, split into :data:`PHASES` by the restart's own timings (loop.RankRun)."""
    engine, first_batch = first_report["restart_engine_s"], first_report["restart_first_batch_s"]
    load = first_report["restart_load_s"] + first_report.get("restart_reshard_s", 0.0)
    restart = first_report["restart_started_at"] - killed_at
    return {
        "detection and group restart s": restart,
        "engine rebuild s": engine,
        "checkpoint load s": load,
        "first batch s": first_batch,
        "first step and report s": first_report["reported_at"] - killed_at - restart - engine - load - first_batch,
    }


def test_recovery_after_a_killed_worker(tmp_path, record_benchmark):
    import ray

    from cluster.chain import run_stage
    from cluster.connect import connect
    from cluster.recipe import load_config
    from pipelines.train.trainer import ledger_path

    cfg = load_config(
        TINY, [f"storage={tmp_path}", "run_name=recovery", "data.max_documents=120", "data.vocab_size=1024"]
    )
    connect(cfg.cluster)
    run_stage("data", cfg)
    config = resume_config(cfg.train, STEPS, CHECKPOINT_EVERY)
    quantities = {"seconds to progress": [], "steps redone": [], "steps skipped": [], "killed after step": []}
    micro, batch = config.micro_batch_size, config.effective_global_batch_size
    planned = planned_rows(cfg.run_dir() / "data", STEPS, batch, micro)
    quantities.update({phase: [] for phase in PHASES})
    accounts: list[tuple[int, int]] = []
    for run in range(RUNS):
        killed: dict[str, float] = {}
        result, history = fit(config, cfg, tmp_path, f"killed-{run}", during=killer(KILL_AFTER, killed))
        assert killed and result.metrics["step"] == STEPS
        rows = [json.loads(line) for line in history.read_text().splitlines()]
        after = [row for row in rows if row["reported_at"] > killed["at"] and not row.get("final")]
        first_after = after[0]
        assert first_after["step"] == CHECKPOINT_EVERY + 1
        quantities["seconds to progress"].append(first_after["reported_at"] - killed["at"])
        for phase, seconds in recovery_phases(first_after, killed["at"]).items():
            quantities[phase].append(seconds)
        quantities["steps redone"].append(int(killed["step"]) - CHECKPOINT_EVERY)
        quantities["steps skipped"].append(len(set(range(1, STEPS + 1)) - set(reported_steps(history))))
        quantities["killed after step"].append(int(killed["step"]))
        # The sample ledger (the micro-batches the final model trained on) against the plan from the shards.
        accounts.append(lost_and_repeated(trained_rows(ledger_path(tmp_path, f"killed-{run}")), planned))
    ray.shutdown()
    quantities.update(sequence_accounts(accounts, micro))
    assert quantities["steps skipped"] == [0] * RUNS
    record_benchmark(
        "recovery",
        stage="train: recovery",
        measure="kill -9 on one of 2 training workers: seconds until training progresses again",
        inputs={
            "workers": config.num_workers,
            "checkpoint_every": CHECKPOINT_EVERY,
            "kill_after_step": KILL_AFTER,
            "steps": STEPS,
            "model": "the tiny recipe's model",
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "seconds to progress after a kill",
                "seconds from the kill to the next step reported",
                quantities,
                "seconds to progress",
                better="lower",
            ),
            *(
                comparison(
                    f"recovery: {phase.removesuffix(' s')}",
                    f"seconds of the recovery spent on {phase.removesuffix(' s')}",
                    quantities,
                    phase,
                    better="lower",
                )
                for phase in PHASES
            ),
            comparison(
                "sequences lost or repeated after a kill",
                "sequences of the plan the final model did not train in their epoch, plus those it trained more "
                "than once (sample ledger against the packed shards)",
                quantities,
                "sequences lost or repeated",
                better="lower",
            ),
            comparison(
                "steps redone after a kill",
                "steps trained twice (since the last checkpoint)",
                quantities,
                "steps redone",
                better="lower",
            ),
        ],  # fmt: skip
    )
