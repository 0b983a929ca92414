"""`loom submit run` to a cluster of three nodes (network namespaces on a bridge, tests/netns.py): the data stage's
tasks run on more than one node, the two training workers on two nodes (gloo over the bridge, the path NCCL takes
on GPUs), two vLLM replicas on two nodes, and the endpoint answers through the head's proxy and a worker node's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections import Counter

import pytest

from tests.conftest import REPO_ROOT, SMALL_MODEL, TINY
from tests.helpers import wait_for
from tests.multinode.conftest import API_KEY
from tests.netns import SERVE_PORT

pytestmark = pytest.mark.multinode
MODEL = "loom-tiny"


def job_tasks(cluster, job_id: str) -> list[dict]:
    found = cluster.get(
        f"/api/v0/tasks?limit=10000&detail=1&filter_keys=job_id&filter_predicates=%3D&filter_values={job_id}"
    )
    return found["data"]["result"]["result"]


def job_actors(cluster, job_id: str, class_name: str) -> list[dict]:
    found = cluster.get(
        "/api/v0/actors?limit=1000&detail=1&filter_keys=job_id&filter_keys=class_name"
        f"&filter_predicates=%3D&filter_predicates=%3D&filter_values={job_id}&filter_values={class_name}"
    )
    return found["data"]["result"]["result"]


def complete(address: str, prompt: str) -> dict:
    request = urllib.request.Request(
        f"http://{address}:{SERVE_PORT}/v1/completions",
        data=json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 8}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def chain(cluster, tmp_path_factory):
    """The chain submitted from this machine (outside every namespace) to the head's dashboard, as `loom submit`
    reaches a remote cluster; storage is the disk every node shares."""
    storage = tmp_path_factory.mktemp("multinode-runs")
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "submit", "run", str(TINY),
         f"storage={storage}", "run_name=across", "data.max_documents=150", *SMALL_MODEL,
         "train.max_steps=12", "train.checkpoint_every=6", "train.eval_every=6",
         "train.placement_strategy=STRICT_SPREAD",  # one worker a node
         "tune.enabled=false", "compress.enabled=false",  # their sweeps: tests/ray/test_stages.py, test_compress.py
         "serve.host=0.0.0.0",  # the nodes' addresses on the bridge; the key in every node's environment
         f"serve.models.{MODEL}.autoscaling={{min_replicas: 2, max_replicas: 2}}",
         "--address", cluster.dashboard],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=2400, env=cluster.env,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    submission = re.search(r"\[loom\] submitted (\S+) to ", output).group(1)
    job_id = cluster.get(f"/api/jobs/{submission}")["job_id"]
    yield {"output": output, "job_id": job_id, "run_dir": storage / "across"}
    # The application stays deployed after the job (as on any cluster): the next modules want the nodes' CPUs.
    cluster.get("/api/serve/applications/", method="DELETE")
    wait_for(lambda: not cluster.get("/api/serve/applications/")["applications"], 300, "Serve to shut down")


def test_the_data_stage_runs_on_more_than_one_node(cluster, chain):
    nodes = cluster.node_addresses()
    # Ray Data's operators (reads, maps, shuffles) run as tasks named after them; the chain's own tasks aside.
    data_tasks = [
        task
        for task in job_tasks(cluster, chain["job_id"])
        if re.match(r"^(Read|Map|_shuffle|Hash|Sort|Aggregate|Repartition)", task["name"])
    ]
    where = Counter(nodes[task["node_id"]] for task in data_tasks if task.get("node_id"))
    assert len(where) >= 2, (where, sorted({task["name"] for task in data_tasks}))
    assert (chain["run_dir"] / "data" / "_COMPLETE").is_file()


def test_training_workers_run_on_two_nodes_and_learn(cluster, chain):
    nodes = cluster.node_addresses()
    workers = job_actors(cluster, chain["job_id"], "RayTrainWorker")
    assert len(workers) >= 2, workers
    assert len({nodes[worker["node_id"]] for worker in workers}) == 2, [w["node_id"] for w in workers]
    manifest = json.loads((chain["run_dir"] / "manifest.json").read_text())
    trained = manifest["stages"]["train"]["metrics"]
    assert trained["val_perplexity"] < trained["initial_val_perplexity"], trained


def test_two_replicas_on_two_nodes_answer_through_the_head_and_a_worker_node(cluster, chain):
    applications = cluster.get("/api/serve/applications/")["applications"]
    replicas = [
        replica
        for application in applications.values()
        for name, deployment in application["deployments"].items()
        if "LLM" in name
        for replica in deployment["replicas"]
    ]
    replica_nodes = {replica["node_ip"] for replica in replicas if replica["state"] == "RUNNING"}
    assert len(replica_nodes) == 2, replicas
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
