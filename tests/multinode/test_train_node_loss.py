"""A node lost during training with a fixed worker count (three workers, one a node, STRICT_SPREAD):

- the node comes back within ``train.wait_for_nodes_s``: training resumes from its last checkpoint at the same
  data position, and every step's loss equals an undisturbed run's;
- it does not: the stage stops within the bound with a message that says why and what to do;

and with an elastic one (``train.num_workers=[2, 3]``): training goes on with the two survivors without waiting and
grows back to three when the node returns; the steps trained again at the other size from the same checkpoint have
the same losses within a stated tolerance, and the micro-batches the final model trained on (its sample ledger) are
the packed shards' in order, each once per epoch, in the steps a run that never resized would put them.
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.helpers import wait_for
from tests.multinode.scenarios import (
    CHECKPOINT_EVERY,
    ELASTIC_BATCH,
    ELASTIC_STEPS,
    JOB_S,
    TRAIN_STEPS,
    lose_a_training_node,
    shrink_and_grow,
    steps,
    submit,
    train_overrides,
)

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """One data stage, copied into a run per case (the same shards), and the undisturbed training."""
    storage = tmp_path_factory.mktemp("train-node-loss")
    submit(cluster, storage, "data", "base")
    for name in ("undisturbed", "resumed", "stopped", "elastic"):
        shutil.copytree(storage / "base", storage / name)
    submit(cluster, storage, "train", "undisturbed", *train_overrides(120))
    return storage


def test_training_resumes_exactly_when_the_lost_node_returns(cluster, runs):
    reference = {row["step"]: row["loss"] for row in steps(runs / "undisturbed")}
    assert sorted(reference) == list(range(1, TRAIN_STEPS + 1)), sorted(reference)
    measured = lose_a_training_node(cluster, runs, "resumed")  # the job succeeded, a step came after the loss
    history = steps(runs / "resumed")
    after = [row for row in history if row["reported_at"] > measured.lost_at]
    # It went on from a checkpoint taken before the kill (the step after one; steps past it are reported again),
    # with the same data and losses.
    before = max(row["step"] for row in history if row["reported_at"] <= measured.lost_at)
    assert (after[0]["step"] - 1) % CHECKPOINT_EVERY == 0 and after[0]["step"] <= before + 1, (after[0], before)
    last = {row["step"]: row["loss"] for row in history}  # a step reported twice: its last report wins
    assert sorted(last) == sorted(reference)
    assert all(abs(last[step] - reference[step]) <= 1e-5 for step in reference), {
        step: (last[step], reference[step]) for step in reference if abs(last[step] - reference[step]) > 1e-5
    }
    print(measured.line("training node lost"))


#: How far a step's loss may move when it is trained again at another worker count from the same checkpoint: the
#: same rows and global batch, summed in another order (accumulation on fewer workers in place of an all-reduce).
RESIZE_TOLERANCE = 1e-4


def trained_rows(run_dir) -> list[tuple]:
    """(step, epoch, index in the epoch, token hash) of every micro-batch the run's final model trained on."""
    from pipelines.train.ledger import read_ledger
    from pipelines.train.trainer import ledger_path

    return [
        (row["step"], row["epoch"], row["index"], row["hash"])
        for row in read_ledger(ledger_path(run_dir / "train", "ray"))
    ]


def planned_rows(run_dir, steps: int, batch: int, micro: int) -> list[tuple]:
    """(step, epoch, index in the epoch, token hash) of every micro-batch a run should train, read from its packed
    shards alone: the rows in order, ``batch // micro`` micro-batches a step, epochs of whole steps."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipelines.train.ledger import fingerprint

    table = pq.read_table(run_dir / "data" / "train")
    ids = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)).astype("int64")
    per_step = batch // micro
    steps_per_epoch = len(ids) // micro // per_step

    def token_hash(index: int) -> str:
        import torch

        return fingerprint(torch.from_numpy(ids[index * micro : (index + 1) * micro]))

    planned = []
    for step in range(1, steps + 1):
        epoch, in_epoch = divmod(step - 1, steps_per_epoch)
        for index in range(in_epoch * per_step, (in_epoch + 1) * per_step):
            planned.append((step, epoch, index, token_hash(index)))
    return planned


def test_elastic_training_shrinks_on_a_lost_node_and_grows_back(cluster, runs):
    measured = shrink_and_grow(cluster, runs, "elastic")
    history = [row for row in steps(runs / "elastic") if not row.get("final")]
    worlds = [row["world_size"] for row in history]
    # Three workers, then two (without waiting for the node), then three again.
    assert worlds[0] == 3 and 2 in worlds and worlds[-1] == 3, worlds
    shrunk = next(row for row in history if row["world_size"] == 2)
    assert shrunk["grad_accum"] == 6 and shrunk["restart_reshard_s"] > 0, shrunk
    grown = next(row for row in history[history.index(shrunk) :] if row["world_size"] == 3)
    # (re-sharded only if two workers wrote a checkpoint before the group grew)
    assert grown["grad_accum"] == 4 and grown["restart_load_s"] > 0, grown
    for restart in (shrunk, grown):  # each from a checkpoint
        assert (restart["step"] - 1) % 8 == 0, restart

    # The steps trained again after each resize, from the same checkpoint at the other size: the same losses.
    by_step: dict[int, list[tuple[int, float]]] = {}
    for row in history:
        by_step.setdefault(row["step"], []).append((row["world_size"], row["loss"]))
    again = {step: runs_ for step, runs_ in by_step.items() if len({world for world, _ in runs_}) > 1}
    assert {3, 2} <= {runs_[0][0] for runs_ in again.values()}, again  # after the shrink and after the grow
    drift = {step: max(loss for _, loss in runs_) - min(loss for _, loss in runs_) for step, runs_ in again.items()}
    assert max(drift.values()) <= RESIZE_TOLERANCE, again
    assert sorted(by_step) == list(range(1, ELASTIC_STEPS + 1))

    # The micro-batches the final model trained on are the packed shards' in order, each once per epoch, in the
    # steps a run that never resized would put them.
    rows = trained_rows(runs / "elastic")
    assert len({epoch for _, epoch, _, _ in rows}) > 1  # across epoch boundaries
    assert sorted(rows) == planned_rows(runs / "elastic", ELASTIC_STEPS, ELASTIC_BATCH, micro=8)
    print(
        measured.line("elastic training, a node lost and back"), f"; largest loss difference {max(drift.values()):.1e}"
    )


# Last: the node it leaves lost comes back just before the module ends, and Ray Train counts nodes through Ray Data's
# autoscaling coordinator, which looks every 20 s; the elastic test, which must start on three workers, runs before.
def test_training_stops_and_says_why_when_the_node_stays_lost(cluster, runs):
    wait_s = 30
    lost = cluster.workers[1]
    _, submission = submit(cluster, runs, "train", "stopped", *train_overrides(wait_s), wait=False)
    wait_for(lambda: len(steps(runs / "stopped")) >= 2, JOB_S, "training to start")
    killed_at = time.monotonic()
    lost.kill()
    try:
        final = cluster.job_ended(submission, JOB_S)
        stopped_after_s = time.monotonic() - killed_at
        assert final["status"] == "FAILED", final
        logs = cluster.get(f"/api/jobs/{submission}/logs")["logs"]
        assert f"found no room on the cluster within train.wait_for_nodes_s={wait_s} s" in logs, logs[-3000:]
        assert "run the train stage again once the nodes are back" in logs
        # Detection (Ray's node health checks, Train's worker poll) and the bounded wait, then no longer.
        assert stopped_after_s < wait_s + 120, stopped_after_s
        print(f"training stopped {stopped_after_s:.1f} s after its node's loss (wait_for_nodes_s={wait_s})")
    finally:
        cluster.replace_lost(lost)  # for the tests after this one
