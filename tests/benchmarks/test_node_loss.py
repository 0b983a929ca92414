"""Node loss on three nodes in network namespaces (tests/netns.py; needs root), three rounds of each case
(tests/multinode/scenarios.py), seconds from the loss to each milestone:

- training (three workers, one a node): a worker node killed past the first checkpoint and started again once
  Ray declares it dead;
- elastic training (two to three workers): a worker node killed, the group going on with two, the node started
  again and the group grown back to three; the shrink's restart broken down;
- serving (the chain deployed once, two vLLM replicas on two nodes, four callers): a worker node holding a
  replica killed and replaced, a worker node's link cut for 20 s, the head restarted with its GCS in Redis;
  requests failed in each.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pipelines.train.trainer import ledger_path
from tests.benchmarks.conftest import RUNS, comparison
from tests.multinode.scenarios import (
    CHECKPOINT_EVERY,
    ELASTIC_BATCH,
    ELASTIC_MICRO,
    LINK_CUT_S,
    TRAIN_STEPS,
    Measured,
    cut_a_replica_node_link,
    data_corpus,
    lose_a_data_node,
    lose_a_replica_node,
    lose_a_training_node,
    restart_the_head,
    run_data,
    shrink_and_grow,
    shut_down_serve,
    steps,
    submit,
    submit_chain,
    three_nodes,
)
from tests.training import lost_and_repeated, planned_rows, sequence_accounts, trained_rows

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(5400)]


def elastic_shrink_phases(run_dir: Path, lost_at: float) -> dict[str, float]:
    """The first step two workers reported after the loss, split by the restart's own timings (loop.RankRun)."""
    first = next(row for row in steps(run_dir) if row.get("world_size") == 2 and row["reported_at"] > lost_at)
    restart = first["restart_started_at"] - lost_at
    phases = {
        "detection and group restart": restart,
        "engine rebuild": first["restart_engine_s"],
        "re-sharding": first["restart_reshard_s"],
        "checkpoint load": first["restart_load_s"],
        "first batch": first["restart_first_batch_s"],
    }
    phases["first step and report"] = first["reported_at"] - lost_at - sum(phases.values())
    return phases


SCENARIOS = {
    "node lost": lose_a_replica_node,
    "link cut": lambda cluster: cut_a_replica_node_link(cluster, LINK_CUT_S),
    "head restart": restart_the_head,
}


NODES = "a head (2 CPUs) and two workers (3 CPUs each), each a network namespace on a bridge"


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the namespace cluster needs root (ip netns, a bridge, veth pairs)")
    with three_nodes(Path(f"/tmp/lns{os.getpid()}b")) as running:
        yield running


def test_node_loss_during_the_data_stage(cluster, tmp_path, record_benchmark):
    corpus = data_corpus(tmp_path)
    quantities: dict[str, list[float]] = {
        "undisturbed stage seconds": [], "stage seconds with a node lost": [], "seconds to declared dead": [],
        "seconds from the loss to the stage complete": [],
    }  # fmt: skip
    for round_ in range(RUNS):  # side by side: an undisturbed run, then one that loses a node
        quantities["undisturbed stage seconds"].append(run_data(cluster, tmp_path, corpus, f"undisturbed-{round_}"))
        measured = lose_a_data_node(cluster, tmp_path, corpus, f"disturbed-{round_}")
        print(measured.line("data node lost"))
        quantities["stage seconds with a node lost"].append(measured.seconds["stage"])
        quantities["seconds to declared dead"].append(measured.seconds["declared dead"])
        quantities["seconds from the loss to the stage complete"].append(measured.seconds["stage complete"])
    record_benchmark(
        "node_loss_data",
        stage="data: a node lost",
        measure="the data stage with a worker node killed as near-dedup starts, against an undisturbed run",
        inputs={
            "nodes": NODES,
            "corpus": "about 2,000 planted documents (near-duplicates, exact copies, too short)",
            "steps": "normalize, length, exact dedup, near dedup (MinHash), tokenizer, packing",
            "loss": "every process of a worker node killed as near-dedup starts; started again once dead",
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "stage seconds, a node lost vs undisturbed",
                "the stage's run time with a node lost over an undisturbed run's",
                quantities,
                "stage seconds with a node lost",
                "undisturbed stage seconds",
                better="lower",
            ),
            comparison(
                "seconds from a data node's loss to the stage complete",
                "seconds from the loss until the stage completed",
                quantities,
                "seconds from the loss to the stage complete",
                better="lower",
            ),
        ],  # fmt: skip
    )


def test_node_loss_during_training(cluster, tmp_path, record_benchmark):
    submit(cluster, tmp_path, "data", "base")
    rounds: list[Measured] = []
    for round_ in range(RUNS):
        shutil.copytree(tmp_path / "base", tmp_path / f"round-{round_}")
        rounds.append(lose_a_training_node(cluster, tmp_path, f"round-{round_}"))
        print(rounds[-1].line("training node lost"))
    quantities = {f"seconds to {milestone}": [m.seconds[milestone] for m in rounds] for milestone in rounds[0].seconds}
    record_benchmark(
        "node_loss_training",
        stage="train: a node lost",
        measure="seconds from a training node's loss to each milestone (fixed worker count, the node back)",
        inputs={
            "nodes": NODES,
            "workers": "three, one a node (STRICT_SPREAD)",
            "steps": TRAIN_STEPS,
            "checkpoint_every": CHECKPOINT_EVERY,
            "loss": "every process of a worker node killed past the first checkpoint; started again once dead",
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "seconds to progress after a node's loss",
                "seconds from the node's loss to the next step reported",
                quantities,
                "seconds to training progressing",
                better="lower",
            ),
            comparison(
                "seconds to the node declared dead",
                "seconds from the loss until Ray lists the node dead",
                quantities,
                "seconds to declared dead",
                better="lower",
            ),
        ],  # fmt: skip
    )


def test_node_loss_while_serving(cluster, tmp_path, record_benchmark):
    rounds: dict[str, list[Measured]] = {name: [] for name in SCENARIOS}
    submit_chain(cluster, tmp_path / "runs", "node-loss")
    try:
        for _ in range(RUNS):
            for name, scenario in SCENARIOS.items():
                measured = scenario(cluster)
                print(measured.line(name))
                rounds[name].append(measured)
    finally:
        shut_down_serve(cluster)
    quantities: dict[str, list[float]] = {}
    for name, measured in rounds.items():
        for milestone in measured[0].seconds:
            quantities[f"{name}: seconds to {milestone}"] = [m.seconds[milestone] for m in measured]
        quantities[f"{name}: requests"] = [m.requests for m in measured]
        quantities[f"{name}: requests failed"] = [m.failed_count for m in measured]
        quantities[f"{name}: requests failed, %"] = [100 * m.failed_count / m.requests for m in measured]
    restarts = rounds["head restart"]
    quantities["head restart: requests answered while the head was down"] = [m.answered_during for m in restarts]
    quantities["head restart: requests failed after the recovery"] = [m.failed_after for m in restarts]
    quantities["head restart: Serve replicas on the head"] = [m.replicas_lost for m in restarts]
    record_benchmark(
        "node_loss",
        stage="cluster: node loss while serving",
        measure="seconds from a node's loss to each milestone, and requests failed, under four callers",
        inputs={
            "nodes": NODES,
            "replicas": "two vLLM replicas of the tiny recipe's model, two ingress replicas",
            "load": "four callers, each at most a request a second, 60 s timeout, 8 tokens",
            "link_cut_s": LINK_CUT_S,
            "gcs": "fault tolerant: its tables in a password-protected Redis on a fourth namespace",
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "node lost: seconds to the replica running again",
                "a worker node holding a replica killed, "
                "a replacement started once Ray declares it dead: seconds to the replica running on it",
                quantities,
                "node lost: seconds to replica running",
                better="lower",
            ),
            comparison(
                "node lost: requests failed, %",
                "requests failed while a node holding a replica was lost",
                quantities,
                "node lost: requests failed, %",
                better="lower",
            ),
            comparison(
                "node lost: seconds to declared dead",
                "seconds from the kill until Ray lists the node dead",
                quantities,
                "node lost: seconds to declared dead",
                better="lower",
            ),
            comparison(
                "link cut: requests failed, %",
                f"requests failed while a node's link was cut {LINK_CUT_S} s",
                quantities,
                "link cut: requests failed, %",
                better="lower",
            ),
            comparison(
                "head restart: seconds to the applications running",
                "the head killed and restarted: seconds to Serve's applications running again",
                quantities,
                "head restart: seconds to applications running",
                better="lower",
            ),
            comparison(
                "head restart: requests failed, %",
                "requests through a worker node's proxy that failed during a head restart",
                quantities,
                "head restart: requests failed, %",
                better="lower",
            ),
        ],  # fmt: skip
    )


#: The benchmark's elastic runs: longer than the test's (tests/multinode), as docs/results/node_loss_elastic.json
#: records them; with Ray's default failure detection (about 15 s) the survivors train longer before the grow-back.
BENCH_ELASTIC_STEPS = 96


def test_elastic_training_on_a_lost_node(cluster, tmp_path, record_benchmark):
    submit(cluster, tmp_path, "data", "base")
    rounds: list[Measured] = []
    phases: list[dict[str, float]] = []
    accounts: list[tuple[int, int]] = []
    for round_ in range(RUNS):
        shutil.copytree(tmp_path / "base", tmp_path / f"elastic-{round_}")
        rounds.append(shrink_and_grow(cluster, tmp_path, f"elastic-{round_}", BENCH_ELASTIC_STEPS))
        phases.append(elastic_shrink_phases(tmp_path / f"elastic-{round_}", rounds[-1].lost_at))
        # The sample ledger against the plan read from the packed shards: every sequence once per epoch.
        run_dir = tmp_path / f"elastic-{round_}"
        accounts.append(
            lost_and_repeated(
                trained_rows(ledger_path(run_dir / "train", "ray")),
                planned_rows(run_dir / "data", BENCH_ELASTIC_STEPS, ELASTIC_BATCH, ELASTIC_MICRO),
            )
        )
        print(rounds[-1].line("elastic training, a node lost and back"), phases[-1], "lost, repeated:", accounts[-1])
    quantities = {f"seconds to {milestone}": [m.seconds[milestone] for m in rounds] for milestone in rounds[0].seconds}
    quantities.update({f"shrink: {phase} s": [p[phase] for p in phases] for phase in phases[0]})
    quantities.update(sequence_accounts(accounts, ELASTIC_MICRO))
    record_benchmark(
        "node_loss_elastic",
        stage="train: elastic, a node lost",
        measure="seconds from a training node's loss to each milestone (train.num_workers=[2, 3]), and where the "
        "shrink's seconds go",
        inputs={
            "nodes": NODES,
            "workers": "two to three, 2 CPUs each (a node holds one)",
            "steps": BENCH_ELASTIC_STEPS,
            "checkpoint_every": 8,
            "resize_check_s": 5,
            "loss": "every process of a worker node killed past the first checkpoint; started again once two "
            "workers reported a step",
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "seconds to progress on the survivors",
                "seconds from the node's loss to a step reported by the two survivors",
                quantities,
                "seconds to progressing on 2 workers",
                better="lower",
            ),
            comparison(
                "sequences lost or repeated across the resizes",
                "sequences of the plan not trained in their epoch plus sequences trained more than once (sample "
                "ledger against the packed shards)",
                quantities,
                "sequences lost or repeated",
                better="lower",
            ),
            comparison(
                "seconds to grow back after the node returned",
                "seconds from the node's loss to a step reported by three workers again",
                quantities,
                "seconds to progressing on 3 workers",
                better="lower",
            ),
            *(
                comparison(
                    f"elastic shrink: {phase}",
                    f"seconds of the shrink spent on {phase}",
                    quantities,
                    f"shrink: {phase} s",
                    better="lower",
                )
                for phase in phases[0]
            ),
        ],  # fmt: skip
    )
