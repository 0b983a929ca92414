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

import time

import pytest

from pipelines.train.trainer import ledger_path
from tests.helpers import wait_for
from tests.multinode.scenarios import (
    CHECKPOINT_EVERY,
    ELASTIC_BATCH,
    ELASTIC_MICRO,
    ELASTIC_STEPS,
    JOB_S,
    TRAIN_STEPS,
    lose_a_training_node,
    shrink_and_grow,
    steps,
    submit,
    train_overrides,
)
from tests.training import RESIZE_TOLERANCE, loss_spread, planned_rows, trained_at_two_sizes, trained_rows

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def runs(cluster, tiny_data, trained, tmp_path_factory):
    """The package's data stage, copied into a run per case (the same shards), and its undisturbed training (the
    package's ``trained``, which the chain serves) as ``undisturbed``."""
    storage = tmp_path_factory.mktemp("train-node-loss")
    for name in ("resumed", "stopped", "elastic"):
        tiny_data.copy_to(storage, name)
    trained.copy_to(storage, "undisturbed")
    return storage


def test_training_resumes_exactly_when_the_lost_node_returns(cluster, runs):
    reference = {row["step"]: row["loss"] for row in steps(runs / "undisturbed")}
    assert sorted(reference) == list(range(1, TRAIN_STEPS + 1)), sorted(reference)
    measured = lose_a_training_node(cluster, runs, "resumed")  # the job succeeded, a step came after the loss
    history = steps(runs / "resumed")
    # It went on from a checkpoint taken before the kill (the step after one; steps past it are reported again),
    # with the same data and losses. The restored group's first report is the first one that says what its restore
    # cost: a step the old group finished just before the kill may be collected after it.
    first = next(
        i for i, row in enumerate(history) if row["reported_at"] > measured.lost_at and "restart_load_s" in row
    )
    restored, before = history[first], max(row["step"] for row in history[:first])
    assert (restored["step"] - 1) % CHECKPOINT_EVERY == 0 and restored["step"] <= before + 1, (restored, before)
    last = {row["step"]: row["loss"] for row in history}  # a step reported twice: its last report wins
    assert sorted(last) == sorted(reference)
    assert all(abs(last[step] - reference[step]) <= 1e-5 for step in reference), {
        step: (last[step], reference[step]) for step in reference if abs(last[step] - reference[step]) > 1e-5
    }
    print(measured.line("training node lost"))


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

    # The steps trained again after each resize, from the same checkpoint at the other size: the same losses. The
    # node is killed past step 10 (checkpoint at 8): the shrink trains steps again; the grow stops the two workers
    # wherever they are, maybe right at a checkpoint, with nothing to train again.
    again = trained_at_two_sizes(history)
    assert 3 in {runs_[0][0] for runs_ in again.values()}, again
    drift = loss_spread(again)
    assert max(drift.values()) <= RESIZE_TOLERANCE, again
    assert sorted({row["step"] for row in history}) == list(range(1, ELASTIC_STEPS + 1))

    # The micro-batches the final model trained on are the packed shards' in order, each once per epoch, in the
    # steps a run that never resized would put them.
    rows = trained_rows(ledger_path(runs / "elastic" / "train", "ray"))
    assert len({epoch for _, epoch, _, _ in rows}) > 1  # across epoch boundaries
    assert sorted(rows) == planned_rows(runs / "elastic" / "data", ELASTIC_STEPS, ELASTIC_BATCH, ELASTIC_MICRO)
    print(
        measured.line("elastic training, a node lost and back"), f"; largest loss difference {max(drift.values()):.1e}"
    )


# Last: the node it leaves lost comes back just before the module ends, and Ray Train counts nodes through Ray Data's
# autoscaling coordinator, which looks every 20 s outside an elastic fit; the elastic test, which must start on three
# workers, runs before.
def test_training_stops_and_says_why_when_the_node_stays_lost(cluster, runs):
    wait_s = 15
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
