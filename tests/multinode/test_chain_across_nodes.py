"""`loom submit run` to a cluster of three nodes (network namespaces on a bridge, tests/netns.py): the data stage's
tasks run on more than one node, the two training workers on two nodes (gloo over the bridge, the path NCCL takes
on GPUs), two vLLM replicas on two nodes, and the endpoint answers through the head's proxy and a worker node's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
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


def complete(address: str, prompt: str, timeout_s: float = 120) -> dict:
    request = urllib.request.Request(
        f"http://{address}:{SERVE_PORT}/v1/completions",
        data=json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 8}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.load(response)


def llm_replicas(cluster) -> list[dict]:
    """The model's replicas as Serve's controller lists them (state, node address)."""
    applications = cluster.get("/api/serve/applications/")["applications"]
    return [
        replica
        for application in applications.values()
        for name, deployment in application["deployments"].items()
        if "LLM" in name
        for replica in deployment["replicas"]
    ]


class Load:
    """``clients`` callers sending completions through ``address``, each at most one a second (under the key's
    rate limit), until stopped; each request's outcome (an HTTP status, or the error's name for a timeout or a
    refused connection) and seconds, and the bodies of the refusals."""

    def __init__(self, address: str, clients: int, timeout_s: float) -> None:
        self.address, self.timeout_s = address, timeout_s
        self.outcomes: list[tuple[str, float]] = []
        self.refusals: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                complete(self.address, f"def client_{i}():", self.timeout_s)
                outcome = "200"
            except urllib.error.HTTPError as err:
                outcome = str(err.code)
                self.refusals.append(err.read().decode(errors="replace")[:300])
            except OSError as err:  # a timeout (reading, or connecting: wrapped in a URLError), a refused connection
                timed_out = isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError)
                outcome = "timeout" if timed_out else type(err).__name__
            seconds = time.monotonic() - started
            self.outcomes.append((outcome, seconds))
            self._stop.wait(max(0.0, 1.0 - seconds))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 10)

    def succeeded(self) -> int:
        return sum(outcome == "200" for outcome, _ in self.outcomes)


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
         "serve.ingress_replicas=2",  # no node's loss takes every ingress with it
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
    replicas = llm_replicas(cluster)
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


REQUEST_TIMEOUT_S = 60


def test_a_node_holding_a_replica_lost_under_load(cluster, chain):
    """Four callers through the head's proxy; a worker node holding a replica killed once they are served, and a
    replacement node started at its address once Ray has declared it dead (the cluster has no spare room for a
    replica of 2 CPUs, as an autoscaler would add one). At least 99% of requests succeed, none outlives its timeout,
    and Serve places the lost replica on the replacement."""
    running = [r for r in llm_replicas(cluster) if r["state"] == "RUNNING"]
    lost = next(worker for worker in cluster.workers if worker.address in {r["node_ip"] for r in running})
    lost_node_id = next(r["node_id"] for r in running if r["node_ip"] == lost.address)
    with Load(cluster.head.address, clients=4, timeout_s=REQUEST_TIMEOUT_S) as load:
        wait_for(lambda: load.succeeded() >= 20, 300, "the load to be served")
        lost.kill()
        killed_at = time.monotonic()
        try:
            wait_for(lambda: lost.address not in cluster.alive_node_addresses(), 120, "Ray to declare the node dead")
            detected_s = time.monotonic() - killed_at
        finally:  # the replacement comes whatever happened: the tests after this one need three nodes
            cluster.start_worker(lost, cluster.worker_cpus)
        wait_for(lambda: lost.address in cluster.alive_node_addresses(), 300, "the replacement node to join")
        joined_s = time.monotonic() - killed_at

        def replaced() -> bool:
            now = [r for r in llm_replicas(cluster) if r["state"] == "RUNNING"]
            return len(now) == 2 and lost_node_id not in {r["node_id"] for r in now}

        wait_for(replaced, 600, "Serve to replace the lost replica")
        replaced_s = time.monotonic() - killed_at
        after = len(load.outcomes)
        wait_for(lambda: len(load.outcomes) >= after + 20, 300, "requests after the replacement")
    outcomes = [outcome for outcome, _ in load.outcomes]
    failed = {outcome: outcomes.count(outcome) for outcome in set(outcomes) - {"200"}}
    print(
        f"node lost: declared dead after {detected_s:.1f} s, replacement joined at {joined_s:.1f} s, replica "
        f"running at {replaced_s:.1f} s; {len(outcomes)} requests, failed: {failed}"
    )
    assert load.succeeded() >= 0.99 * len(outcomes), (failed, load.refusals[:5])
    assert "timeout" not in outcomes, failed  # no request hung until its timeout
