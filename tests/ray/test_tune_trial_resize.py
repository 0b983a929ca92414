"""A sweep trial is elastic as the train stage is (tune.workers_per_trial=[1, 2]): it starts on the one worker the
cluster has room for, grows to two when a second Ray node joins, shrinks back to one when that node is lost, and
finishes. Each resize goes on from the trial's last checkpoint with the same global batch; the steps trained again
at the other size have the same losses, and the micro-batches its final model trained on are the packed shards' in
order, each once per epoch (its sample ledger).

Last in this folder: the node it adds and loses stays in Ray's node table as a dead one."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from tests.helpers import wait_for
from tests.ray.nodes import added_node, lose
from tests.training import (
    RESIZE_TOLERANCE,
    loss_spread,
    planned_rows,
    start_from_data_stage,
    trained_at_two_sizes,
    trained_rows,
)

pytestmark = pytest.mark.ray

#: One worker's logical CPUs: the tests' head node (10) has room for one (Ray Train counts a node's whole CPUs,
#: the trial's own one included), the added node for another.
WORKER_CPUS = 6
MICRO, GLOBAL_BATCH, CHECKPOINT_EVERY = 8, 32, 16
#: The node is lost once two workers have reported a step at most this far past a checkpoint: the workers, a step or
#: two ahead of the driver's file (here two workers trained 2-5 steps a second), must not reach the next checkpoint
#: before the loss, or no step is trained again at one worker.
LOSS_WINDOW = 6
#: Long enough that the trial is still training when the node is lost, and no longer: every step after that is the
#: test's wait. One worker past its first checkpoint, the node added; Ray Train sees it (an elastic fit looks every
#: 2 s) and restarts on two from the last checkpoint, 16 or, on a fast machine where one worker trains on while the
#: node starts, 32 or 48; the loss once two have trained past a checkpoint of their own (16 steps and more later), where
#: they stop (their peer is gone). 96 steps leave a loss window after a restart from 48; at 128, the steps one worker
#: trained after the loss were 264 s of the test's 664 s in a loaded fresh clone.
STEPS = 96


def result_files(ray_module) -> set:
    """Every trial result file the running Tune drivers write as they go: the copies under the sweep's storage
    follow them only every few seconds, many steps at once, too late to time a node's loss by."""
    session = Path(ray_module._private.worker.global_worker.node.get_session_dir_path())
    return set(session.glob("artifacts/*/sweep/driver_artifacts/run_trial_*/result.json"))


def reports(result_file) -> list[dict]:
    """Every training report of a trial so far (a step reported again after a resize appears twice)."""
    if result_file is None or not result_file.is_file():
        return []
    rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
    return [row for row in rows if "world_size" in row and not row.get("final")]


def test_a_sweep_trial_grows_when_a_node_joins_and_shrinks_when_it_is_lost(data_done, tiny_config, tmp_path):
    import ray

    from cluster.chain import run_stage

    raw = tiny_config.model_dump()
    raw["run_name"] = "tune-resize"
    raw["tune"].update(
        num_trials=1,
        max_steps_per_trial=STEPS,
        workers_per_trial=[1, 2],
        scheduler="fifo",
        space={"train.lr": {"kind": "choice", "values": [3e-3]}},
        objective=None,  # judged by held-out loss: the package's sweep (tune_done) scores trials with the harness
    )
    raw["train"].update(
        num_workers=2,
        cpus_per_worker=WORKER_CPUS,
        micro_batch_size=MICRO,
        gradient_accumulation_steps=GLOBAL_BATCH // (MICRO * 2),
        checkpoint_every=CHECKPOINT_EVERY,
        log_every=1,
        eval_batches=1,
        sample_ledger=True,
        resize_check_s=2,
    )
    config = type(tiny_config).model_validate(raw)
    run_dir = config.run_dir()
    start_from_data_stage(tiny_config.run_dir(), run_dir)
    # The head must hold one worker and not two (what earlier modules reserved is released asynchronously).
    wait_for(
        lambda: WORKER_CPUS < ray.available_resources().get("CPU", 0) < 2 * WORKER_CPUS + 1,
        60,
        lambda: f"room for one {WORKER_CPUS}-CPU worker on the head, not two: {ray.available_resources()}",
    )

    sweep, failure, earlier = run_dir / "tune" / "sweep", [], result_files(ray)

    def sweep_driver():
        try:
            run_stage("tune", config)
        except BaseException as error:  # noqa: BLE001 - handed to the test's thread below
            failure.append(error)

    driver = threading.Thread(target=sweep_driver, daemon=True)
    driver.start()

    trial_file: list = []  # the trial's live result file, once it appears

    def live() -> list[dict]:
        assert not failure, failure
        if not trial_file:
            new = result_files(ray) - earlier
            assert len(new) <= 1, f"more than one new trial result file: {new}"
            trial_file.extend(new)
        return reports(trial_file[0] if trial_file else None)

    def reported(world: int, after: int = 0) -> list[dict]:
        return [row for row in live()[after:] if row["world_size"] == world]

    wait_for(lambda: reported(1) and live()[-1]["step"] > CHECKPOINT_EVERY, 300, "one worker past a checkpoint")
    with added_node(WORKER_CPUS) as node:
        grew_from = len(live())
        wait_for(lambda: reported(2, grew_from), 180, "the trial to grow to two workers")
        # Lost a few steps past a checkpoint two workers wrote: the shrink re-shards it and trains those steps again.
        first_of_two = reported(2, grew_from)[0]["step"]

        def past_a_checkpoint_of_two() -> bool:
            step = reported(2, grew_from)[-1]["step"]
            return step > first_of_two + CHECKPOINT_EVERY and 1 <= step % CHECKPOINT_EVERY <= LOSS_WINDOW

        wait_for(past_a_checkpoint_of_two, 180, "two workers a few steps past their checkpoint", poll_s=0.05)
        shrank_from = len(live())
        lose(node)
        wait_for(lambda: reported(1, shrank_from), 180, "the trial to shrink to one worker")
    driver.join(timeout=600)
    assert not driver.is_alive() and not failure, failure

    history = reports(next(sweep.glob("run_trial_*/result.json")))  # what the sweep keeps, all of it by now
    worlds = [row["world_size"] for row in history]
    assert worlds[0] == 1 and worlds[-1] == 1 and 2 in worlds, worlds
    grown = next(row for row in history if row["world_size"] == 2)
    shrunk = next(row for row in history[history.index(grown) :] if row["world_size"] == 1)
    # Each resize from a checkpoint, ZeRO state re-sharded, the global batch kept by accumulation.
    for restart in (grown, shrunk):
        assert restart.get("restart_reshard_s", 0) > 0 and restart.get("restart_load_s", 0) > 0, restart
    assert grown["grad_accum"] == GLOBAL_BATCH // (MICRO * 2) and shrunk["grad_accum"] == GLOBAL_BATCH // MICRO

    # The steps two workers trained past their checkpoint, trained again by one: the same losses. (The grow stops
    # the one worker wherever it is, maybe right at a checkpoint, with no step to train again.)
    again = trained_at_two_sizes(history)
    assert 2 in {runs[0][0] for runs in again.values()}, again
    drift = loss_spread(again)
    assert max(drift.values()) <= RESIZE_TOLERANCE, again
    assert sorted({row["step"] for row in history}) == list(range(1, STEPS + 1))

    ledgers = list((run_dir / "tune" / "trials").glob("*.ledger.jsonl"))
    assert len(ledgers) == 1, ledgers
    rows = trained_rows(ledgers[0])
    assert sorted(rows) == planned_rows(run_dir / "data", STEPS, GLOBAL_BATCH, MICRO)
    best = json.loads((run_dir / "tune" / "best.json").read_text())
    assert [trial["status"] for trial in best["trials"]] == ["completed"], best["trials"]
    print(f"trial resized 1 -> 2 -> 1 workers; largest loss difference {max(drift.values()):.1e}")
