"""`loom submit run` to a cluster of three nodes (network namespaces on a bridge, tests/netns.py): the data stage's
tasks run on more than one node, the three training workers on three nodes (gloo over the bridge, the path NCCL
takes on GPUs), two vLLM replicas on two nodes, and the endpoint answers through the head's proxy and a worker node's.
Then, under a load of four callers (tests/multinode/scenarios.py): a node holding a replica lost, a node's link
cut for 20 s, and the head restarted with its GCS in Redis."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections import Counter

import pytest

from tests.multinode.scenarios import (
    LINK_CUT_S,
    MODEL,
    complete,
    cut_a_replica_node_link,
    lose_a_replica_node,
    restart_the_head,
    running_replicas,
    shut_down_serve,
    submit_chain,
)
from tests.netns import SERVE_PORT

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def chain(cluster, trained, tmp_path_factory):
    """The chain from the package's trained run on (its data stage's job: test_the_data_stage_runs_on_more_than_one_node;
    its training's: test_training_workers_run_on_three_nodes_and_learn): the same config, so the same keys, and
    `loom submit run` goes on to serve."""
    storage = tmp_path_factory.mktemp("multinode-runs")
    trained.copy_to(storage, "across")
    yield submit_chain(cluster, storage, "across")
    shut_down_serve(cluster)  # the next modules want the nodes' CPUs


def test_the_data_stage_runs_on_more_than_one_node(cluster, tiny_data, chain):
    nodes = cluster.node_addresses()
    # Ray Data's operators (reads, maps, shuffles) run as tasks named after them; the stage's own tasks aside.
    data_tasks = [
        task
        for task in cluster.job_tasks(tiny_data.job_id)
        if re.match(r"^(Read|Map|_shuffle|Hash|Sort|Aggregate|Repartition)", task["name"])
    ]
    where = Counter(nodes[task["node_id"]] for task in data_tasks if task.get("node_id"))
    assert len(where) >= 2, (where, sorted({task["name"] for task in data_tasks}))
    # The chain went on from that stage's outputs: the same config, so the same key.
    assert "[loom] data: already complete" in chain.output, chain.output[-3000:]
    assert (chain.run_dir / "data" / "_COMPLETE").is_file()


def test_training_workers_run_on_three_nodes_and_learn(cluster, trained, chain):
    nodes = cluster.node_addresses()
    workers = cluster.job_actors(trained.job_id, "RayTrainWorker")
    assert len(workers) >= 3, workers
    assert len({nodes[worker["node_id"]] for worker in workers}) == 3, [w["node_id"] for w in workers]
    assert "[loom] train: already complete" in chain.output, chain.output[-3000:]
    manifest = json.loads((chain.run_dir / "manifest.json").read_text())
    metrics = manifest["stages"]["train"]["metrics"]
    assert metrics["val_perplexity"] < metrics["initial_val_perplexity"], metrics


def test_two_replicas_on_two_nodes_answer_through_the_head_and_a_worker_node(cluster, chain):
    replica_nodes = {replica["node_ip"] for replica in running_replicas(cluster)}
    assert len(replica_nodes) == 2, running_replicas(cluster)
    # A worker node that holds a replica runs a proxy of its own; the head always does.
    worker = next(address for address in sorted(replica_nodes) if address != cluster.head.address)
    for address in (cluster.head.address, worker):
        answer = complete(address, "def fibonacci(n):")
        assert answer["model"] == MODEL and answer["usage"]["completion_tokens"] > 0, answer
    # Without the key, Loom's ingress refuses the request on a worker node's proxy too.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(
            urllib.request.Request(
                f"http://{worker}:{SERVE_PORT}/v1/completions",
                data=json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 2}).encode(),
                headers={"Content-Type": "application/json"},
            ),
            timeout=60,
        )
    assert refused.value.code == 401


def test_a_node_holding_a_replica_lost_under_load(cluster, chain):
    """At least 99% of requests succeed, none outlives its timeout, and Serve places the lost replica on the
    replacement node (scenarios.lose_a_replica_node)."""
    measured = lose_a_replica_node(cluster)
    print(measured.line("node lost"))
    assert measured.failed_count <= 0.01 * measured.requests, measured
    assert "timeout" not in measured.failed, measured  # no request hung until its timeout


def test_a_node_link_cut_for_20_s_then_restored(cluster, chain):
    """No request hangs past its timeout, and the node rejoins as itself with its replica running
    (scenarios.cut_a_replica_node_link)."""
    measured = cut_a_replica_node_link(cluster, LINK_CUT_S)
    print(measured.line(f"link cut {LINK_CUT_S} s"))
    assert "timeout" not in measured.failed, measured
    assert measured.failed_count <= 0.1 * measured.requests, measured


def test_the_head_restarted_with_its_gcs_in_redis(cluster, chain):
    """Requests are answered through a worker node's proxy while the head is down, the failed ones counted (those
    in flight to a replica on the head wait until the restarted GCS declares the old head dead); once recovered,
    every request is answered, and the restarted head knows every node, the job and the Serve application
    (scenarios.restart_the_head)."""
    if cluster.redis is None:
        pytest.skip("redis-server is not installed (`make system-packages` installs it; CI does)")
    assert cluster.redis.keys() > 0  # the GCS writes its tables there
    measured = restart_the_head(cluster)
    print(measured.line("head restart") + f"; {measured.answered_during} answered while the head was down")
    # The endpoint kept answering through the worker node's proxy while nothing of the head ran.
    assert measured.answered_during > 0, measured
    assert measured.failed_after == 0, measured
    assert cluster.job(chain.submission)["status"] == "SUCCEEDED"  # the job list survived the restart
