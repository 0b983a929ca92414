"""A node lost on a namespace cluster (tests/netns.py), each case run and measured: training with a fixed worker
count, and serving (the chain deployed once, then each loss under a load of callers). The tests
(tests/multinode/) assert on what a scenario returns; the benchmark (tests/benchmarks/test_node_loss.py) records
three rounds of each as a result file."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import REPO_ROOT, SMALL_MODEL, TINY
from tests.helpers import wait_for
from tests.interrupt import inside_step
from tests.netns import SERVE_PORT, NamespaceCluster, namespace_cluster
from tests.planted_corpus import planted_corpus

MODEL = "loom-tiny"
#: The endpoint's key, in every node's environment as an operator puts it there (the serve stage reads it).
API_KEY = "multinode-test-key"
#: Each caller's bound on one request: a request past it counts as "timeout" (a hang), never as served.
REQUEST_TIMEOUT_S = 60
LINK_CUT_S = 20
#: How long the head stays down in the restart case before its Ray is started again.
HEAD_DOWN_S = 10
JOB_S = 900  # a ceiling for a loaded 2-core machine
#: Training in the node-loss cases: three workers, one a node, checkpoints every CHECKPOINT_EVERY steps.
TRAIN_STEPS = 16
CHECKPOINT_EVERY = 4


#: The GCS's node health checks in the tests' cluster: every second, dead after three failures in a row. A killed
#: node (its port refusing) is declared dead in about 3 s instead of Ray's 15 s (3 s x 5), the time every node-loss
#: test waited for it; a node whose link is cut fails each check only at its 10 s timeout, so LINK_CUT_S (20 s) stays
#: short of the ~33 s it takes to be declared dead. The benchmarks measure with Ray's defaults.
FAST_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


def three_nodes(folder: Path, redis: bool = True, fast_detection: bool = False):
    """The cluster the cases run on: a head of 2 logical CPUs and two workers of 3 (no node holds two vLLM
    replicas of 2 CPUs, so two replicas land on two nodes), the key in every node's environment, and with
    ``redis`` the head's GCS in Redis on a machine of its own; with ``fast_detection``, :data:`FAST_DETECTION`."""
    env = {"LOOM_API_KEYS": API_KEY, **(FAST_DETECTION if fast_detection else {})}
    return namespace_cluster(folder, workers=2, head_cpus=2, worker_cpus=3, extra_env=env, redis=redis)


@dataclass
class Chain:
    output: str
    submission: str
    job_id: str
    run_dir: Path


#: The data stage in the node-loss cases: exact and near dedup over a planted corpus (tests/planted_corpus.py).
DATA_STEPS = (
    "[{type: normalize}, {type: length, min_chars: 40}, {type: exact_dedup, num_partitions: 2},"
    " {type: minhash_dedup, num_partitions: 4}]"
)
NEAR_DEDUP = 4  # its position among the steps (00-read first)


def data_corpus(folder: Path) -> Path:
    """About 2,000 short documents: planted near-duplicates, exact copies and too-short ones, as jsonl."""
    documents = planted_corpus(bases=250, variants_per_base=2, uniques=1000, words=80, seed=27)
    texts = [text for _, text in documents.documents]
    texts += texts[:200] + ["too short to keep"] * 20
    path = folder / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def submit_data(cluster: NamespaceCluster, storage: Path, corpus: Path, run_name: str) -> str:
    """`loom submit data --no-wait` of the corpus through DATA_STEPS; the job's submission id."""
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "submit", "data", str(TINY),
         f"storage={storage}", f"run_name={run_name}",
         f"data.sources=[{{format: jsonl, path: '{corpus}', name: planted}}]", f"data.steps={DATA_STEPS}",
         "data.max_documents=null", "data.vocab_size=300", "data.seq_len=64", "data.tokenize_actors=1",
         "data.shuffle=default",  # Ray's shuffle (aggregator actors, some on the lost node), not the tiny recipe's
         "--address", cluster.dashboard, "--no-wait"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=cluster.env,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError((result.stdout + result.stderr)[-4000:])
    return re.search(r"\[loom\] submitted (\S+) to ", result.stdout).group(1)


def job_seconds(cluster: NamespaceCluster, submission: str) -> float:
    """A finished job's run time as Ray's job record has it."""
    record = cluster.job(submission)
    return (record["end_time"] - record["start_time"]) / 1000


def run_data(cluster: NamespaceCluster, storage: Path, corpus: Path, run_name: str) -> float:
    """The data stage undisturbed; its seconds."""
    submission = submit_data(cluster, storage, corpus, run_name)
    ended = cluster.job_ended(submission, JOB_S)
    if ended["status"] != "SUCCEEDED":
        raise AssertionError(ended)
    return job_seconds(cluster, submission)


@dataclass
class Loss:
    """A worker node killed and a new Ray node started at its address once Ray declared it dead."""

    lost_at: float  # time.time() at the kill
    killed_at: float  # time.monotonic() at the kill
    dead_s: float  # seconds until Ray listed the node dead

    def since(self) -> float:
        """Seconds since the kill."""
        return time.monotonic() - self.killed_at


def kill_and_restart(
    cluster: NamespaceCluster, node, stay_down_until: tuple[str, Callable[[float], bool]] | None = None
) -> Loss:
    """Kill every process of ``node`` (the time taken before kill(), which returns once all have exited); once Ray
    lists it dead (and, with ``stay_down_until`` = (what, condition of the kill's wall-clock time), once the
    condition holds), start a new Ray node at its address, whatever happened: what follows needs every node."""
    lost_at, killed_at = time.time(), time.monotonic()
    node.kill()
    try:
        wait_for(lambda: node.address not in cluster.alive_node_addresses(), 120, "Ray to declare the node dead")
        dead_s = time.monotonic() - killed_at
        if stay_down_until is not None:
            what, condition = stay_down_until
            wait_for(lambda: condition(lost_at), JOB_S, what)
    finally:
        cluster.start_worker(node, cluster.worker_cpus)
    return Loss(lost_at, killed_at, dead_s)


def lose_a_data_node(cluster: NamespaceCluster, storage: Path, corpus: Path, run_name: str) -> Measured:
    """The data stage with the first worker node killed the moment near-dedup runs, and started again once Ray has
    declared it dead (for what follows). Milestones: declared dead, the stage complete; and the stage's seconds."""
    lost = cluster.workers[0]
    submission = submit_data(cluster, storage, corpus, run_name)
    in_near_dedup = inside_step("minhash_dedup", NEAR_DEDUP)
    wait_for(lambda: in_near_dedup(storage / run_name), JOB_S, "near-dedup to run", poll_s=0.05)
    loss = kill_and_restart(cluster, lost)
    ended = cluster.job_ended(submission, JOB_S)
    if ended["status"] != "SUCCEEDED":
        raise AssertionError(ended)
    complete_s = loss.since()
    wait_for(lambda: lost.address in cluster.alive_node_addresses(), 300, "the node to be back")
    seconds = {"declared dead": loss.dead_s, "stage complete": complete_s, "stage": job_seconds(cluster, submission)}
    return Measured(seconds, requests=0, lost_at=loss.lost_at)


@dataclass
class StageRun:
    """A run whose stages so far completed on the cluster: its directory and the job that ran the last one."""

    run_dir: Path
    job_id: str

    def copy_to(self, storage: Path, run_name: str) -> Path:
        """A new run ``run_name`` that starts from this one (its manifest says which stages are complete, so the
        chain skips them); the run's directory."""
        return Path(shutil.copytree(self.run_dir, storage / run_name))


def submit_tiny_data(cluster: NamespaceCluster, storage: Path) -> StageRun:
    """The data stage of :func:`submit`'s recipe (the chain's and the training cases'), as a job of its own."""
    _, submission = submit(cluster, storage, "data", "data")
    return StageRun(storage / "data", cluster.job(submission)["job_id"])


def submit_tiny_training(cluster: NamespaceCluster, data: StageRun, storage: Path) -> StageRun:
    """The train stage on a copy of ``data``, undisturbed, with the node-loss cases' settings (:func:`train_overrides`:
    three workers, one a node), as a job of its own: the model the chain serves, and the losses the training cases
    are held to. One training run for both: each costs minutes of make test on this machine."""
    data.copy_to(storage, "undisturbed")
    _, submission = submit(cluster, storage, "train", "undisturbed", *train_overrides(120))
    return StageRun(storage / "undisturbed", cluster.job(submission)["job_id"])


def submit_chain(cluster: NamespaceCluster, storage: Path, run_name: str = "across") -> Chain:
    """`loom submit run` from this machine (outside every namespace) to the head's dashboard, as it reaches a
    remote cluster; storage is the disk every node shares. Two vLLM replicas, two ingress replicas, every node's
    proxy on its bridge address with the key."""
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "submit", "run", str(TINY),
         f"storage={storage}", f"run_name={run_name}", *TINY_RUN,
         *train_overrides(120),  # three workers, one a node: submit_tiny_training's, whose run the tests start from
         "compress.enabled=false",  # its sweep: tests/ray/test_compress.py
         "eval.enabled=false",  # the harness over one model: tests/ray/test_eval.py, tests/e2e/test_loom_run.py
         "serve.host=0.0.0.0",  # the nodes' addresses on the bridge; the key in every node's environment
         "serve.ingress_replicas=2",  # no node's loss takes every ingress with it
         f"serve.models.{MODEL}.autoscaling={{min_replicas: 2, max_replicas: 2}}",
         "--address", cluster.dashboard],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=2400, env=cluster.env,
    )  # fmt: skip
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(output[-6000:])
    submission = re.search(r"\[loom\] submitted (\S+) to ", output).group(1)
    return Chain(output, submission, cluster.job(submission)["job_id"], storage / run_name)


#: What every run of the chain, the data stage and the training cases shares (150 documents, the small model, no
#: sweep: tests/ray/test_stages.py has it): one list, so the chain's stage keys equal those of the runs it copies.
TINY_RUN = ["data.max_documents=150", *SMALL_MODEL, "tune.enabled=false"]


def submit(cluster: NamespaceCluster, storage: Path, stage: str, run_name: str, *overrides: str, wait: bool = True):
    """`loom submit STAGE` of the tiny recipe (150 documents, the small model); its output and submission id."""
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "submit", stage, str(TINY), f"storage={storage}", f"run_name={run_name}",
         *TINY_RUN, *overrides, "--address", cluster.dashboard,
         *([] if wait else ["--no-wait"])],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_S, env=cluster.env,
    )  # fmt: skip
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise AssertionError(output[-5000:])
    return output, re.search(r"\[loom\] submitted (\S+) to ", output).group(1)


#: The training batch of the node-loss cases, at any worker count: 48 sequences a step in micro-batches of 8 (two per
#: worker at three workers, three at two).
BATCH = ["train.micro_batch_size=8", "train.global_batch_size=48", "train.sample_ledger=true"]


def train_overrides(wait_for_nodes_s: float) -> list[str]:
    return [
        "train.num_workers=3", "train.placement_strategy=STRICT_SPREAD", "train.gradient_accumulation_steps=2",
        *BATCH, f"train.max_steps={TRAIN_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1",
        "train.eval_every=8", f"train.wait_for_nodes_s={wait_for_nodes_s}",
    ]  # fmt: skip


#: Elastic training on the three nodes: two to three workers of 2 CPUs (a node of 2 or 3 CPUs holds one, so the
#: group is as large as the nodes alive), 96 sequences a step in micro-batches of 8, room to grow looked for every
#: 5 s. Ray Train sees nodes come and go through Ray Data's autoscaling coordinator, which Loom has look every 2 s
#: during an elastic fit (pipelines.train.trainer.fresh_node_view): the group grows within about 25 s of the node's
#: return (look, resize check, shutdown, restart), so the two survivors must still be training then: 56 steps after
#: the shrink from the step-8 checkpoint, at 0.6-1 s a step (2 epochs in all). In a CI run with 96 steps the survivors
#: trained 11 steps before the group grew back from step 16; the rest was the test's wait.
ELASTIC_STEPS = 64
ELASTIC_MICRO = 8
ELASTIC = [
    "train.num_workers=[2, 3]", "train.cpus_per_worker=2", f"train.micro_batch_size={ELASTIC_MICRO}",
    "train.gradient_accumulation_steps=4", "train.sample_ledger=true", "train.resize_check_s=5",
    "train.checkpoint_every=8", "train.log_every=1", "train.eval_every=32",
]  # fmt: skip
#: Sequences per step of the elastic runs.
ELASTIC_BATCH = 96


def reported_at_world(run_dir: Path, world: int, after: float) -> list[dict]:
    """Steps reported by a group of ``world`` workers after the wall-clock time ``after``."""
    return [row for row in steps(run_dir) if row.get("world_size") == world and row["reported_at"] > after]


def shrink_and_grow(
    cluster: NamespaceCluster, storage: Path, run_name: str, max_steps: int = ELASTIC_STEPS
) -> Measured:
    """Elastic training (:data:`ELASTIC`, ``max_steps`` steps) on three nodes; a worker node killed once training is
    past its first checkpoint and kept down until two workers report a step (training went on without it), then
    started again, until three workers report again (the group grew back). Milestones: declared dead, progressing on two workers,
    the node back, progressing on three. The job must succeed."""
    lost = cluster.workers[0]
    _, submission = submit(cluster, storage, "train", run_name, *ELASTIC, f"train.max_steps={max_steps}", wait=False)
    run_dir = storage / run_name
    wait_for(lambda: len(steps(run_dir)) >= 10, JOB_S, "training past its first checkpoint")
    if {row.get("world_size") for row in steps(run_dir)} != {3}:
        raise AssertionError(f"training did not start on three workers: {steps(run_dir)}")
    shrunk = ("two workers to report a step", lambda lost_at: bool(reported_at_world(run_dir, 2, lost_at)))
    loss = kill_and_restart(cluster, lost, stay_down_until=shrunk)
    shrunk_s = reported_at_world(run_dir, 2, loss.lost_at)[0]["reported_at"] - loss.lost_at
    wait_for(lambda: lost.address in cluster.alive_node_addresses(), 300, "the node to be back")
    back_at, back_s = time.time(), loss.since()
    wait_for(lambda: reported_at_world(run_dir, 3, back_at), JOB_S, "three workers to report a step again")
    grown_s = reported_at_world(run_dir, 3, back_at)[0]["reported_at"] - loss.lost_at
    final = cluster.job_ended(submission, JOB_S)
    if final["status"] != "SUCCEEDED":
        raise AssertionError(final)
    seconds = {
        "declared dead": loss.dead_s,
        "progressing on 2 workers": shrunk_s,
        "node back": back_s,
        "progressing on 3 workers": grown_s,
    }
    return Measured(seconds, requests=0, lost_at=loss.lost_at)


def steps(run_dir: Path) -> list[dict]:
    """The training steps reported so far (a step reported again after a resume appears twice)."""
    path = run_dir / "train" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [row for row in map(json.loads, path.read_text().splitlines()) if "loss" in row]


def shut_down_serve(cluster: NamespaceCluster) -> None:
    """The application stays deployed after the job (as on any cluster): removed for the next modules' room."""
    cluster.get("/api/serve/applications/", method="DELETE")
    wait_for(lambda: not cluster.get("/api/serve/applications/")["applications"], 300, "Serve to shut down")


def complete(address: str, prompt: str, timeout_s: float = 120) -> dict:
    request = urllib.request.Request(
        f"http://{address}:{SERVE_PORT}/v1/completions",
        data=json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 8}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.load(response)


def serve_replicas(cluster: NamespaceCluster, deployment: str = "") -> list[dict]:
    """Serve's replicas (of deployments whose name holds ``deployment``) as its controller lists them (state,
    node id and address)."""
    applications = cluster.get("/api/serve/applications/")["applications"]
    return [
        replica
        for application in applications.values()
        for name, found in application["deployments"].items()
        if deployment in name
        for replica in found["replicas"]
    ]


def llm_replicas(cluster: NamespaceCluster) -> list[dict]:
    """The model's replicas."""
    return serve_replicas(cluster, "LLM")


def running_replicas(cluster: NamespaceCluster) -> list[dict]:
    return [replica for replica in llm_replicas(cluster) if replica["state"] == "RUNNING"]


def answering(condition: Callable[[], bool]) -> Callable[[], bool]:
    """``condition`` as "not yet" while the head's dashboard does not answer (refused, timed out, a 5xx while
    it comes up after a restart)."""

    def check() -> bool:
        try:
            return condition()
        except (OSError, ValueError):  # URLError and HTTPError are OSErrors; a half-written JSON a ValueError
            return False

    return check


class Load:
    """``clients`` callers sending completions through ``address``, each at most one a second (under the key's
    rate limit), until stopped; each request's start (monotonic) and outcome (an HTTP status, or the error's name
    for a timeout or a refused connection), and the bodies of the refusals."""

    def __init__(self, address: str, clients: int = 4, timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.address, self.timeout_s = address, timeout_s
        self.timeline: list[tuple[float, str]] = []
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
            self.timeline.append((started, outcome))
            self._stop.wait(max(0.0, 1.0 - (time.monotonic() - started)))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 10)

    def requests(self) -> int:
        return len(self.timeline)

    def succeeded(self) -> int:
        return sum(outcome == "200" for _, outcome in self.timeline)

    def failed(self) -> dict[str, int]:
        outcomes = [outcome for _, outcome in self.timeline]
        return {outcome: outcomes.count(outcome) for outcome in set(outcomes) - {"200"}}

    def answered_between(self, start: float, end: float) -> int:
        """Requests sent in [start, end] that were answered."""
        return sum(outcome == "200" and start <= at <= end for at, outcome in self.timeline)

    def served(self, count: int, timeout_s: float = 300) -> None:
        """Wait for ``count`` more requests to end (each counted whatever its outcome)."""
        target = self.requests() + count
        wait_for(lambda: self.requests() >= target, timeout_s, f"{count} more requests")


@dataclass
class Measured:
    """One loss under load: seconds from the loss to each milestone, and the requests' outcomes."""

    seconds: dict[str, float]
    requests: int
    failed: dict[str, int] = field(default_factory=dict)
    answered_during: int = 0  # requests sent while the lost part was down that were answered
    lost_at: float = 0.0  # when the loss happened (time.time())
    failed_after: int = 0  # requests sent once the cluster had recovered that failed
    replicas_lost: int = 0  # Serve replicas (any deployment) on the lost node

    @property
    def failed_count(self) -> int:
        return sum(self.failed.values())

    def line(self, what: str) -> str:
        milestones = ", ".join(f"{name} {value:.1f} s" for name, value in self.seconds.items())
        requests = f"; {self.requests} requests, failed: {self.failed}" if self.requests else ""
        replicas = f"; {self.replicas_lost} Serve replicas were on the lost node" if self.replicas_lost else ""
        return f"{what}: {milestones}{requests}{replicas}"


def replica_worker(cluster: NamespaceCluster):
    """A worker node (not the head) that holds a running model replica."""
    holding = {replica["node_ip"] for replica in running_replicas(cluster)}
    return next(worker for worker in cluster.workers if worker.address in holding)


def lose_a_replica_node(cluster: NamespaceCluster) -> Measured:
    """Four callers through the head's proxy; a worker node holding a replica killed once they are served, and a
    replacement node started at its address once Ray has declared it dead (the cluster has no spare room for a
    replica of 2 CPUs, as an autoscaler would add one). Milestones: declared dead, replacement joined, the lost
    replica running on it."""
    lost = replica_worker(cluster)
    lost_node_id = next(r["node_id"] for r in running_replicas(cluster) if r["node_ip"] == lost.address)
    with Load(cluster.head.address) as load:
        wait_for(lambda: load.succeeded() >= 20, 300, "the load to be served")
        loss = kill_and_restart(cluster, lost)
        wait_for(lambda: lost.address in cluster.alive_node_addresses(), 300, "the replacement node to join")
        joined_s = loss.since()

        def replaced() -> bool:
            now = running_replicas(cluster)
            return len(now) == 2 and lost_node_id not in {r["node_id"] for r in now}

        wait_for(replaced, 600, "Serve to replace the lost replica")
        replaced_s = loss.since()
        load.served(20)
    seconds = {"declared dead": loss.dead_s, "replacement joined": joined_s, "replica running": replaced_s}
    return Measured(seconds, load.requests(), load.failed())


def cut_a_replica_node_link(cluster: NamespaceCluster, cut_s: float = LINK_CUT_S) -> Measured:
    """Four callers through the head's proxy; the link of a worker node holding a replica cut for ``cut_s`` (its
    packets dropped, as a switch port going down does), then restored. Milestones, from the restore: the node
    alive as itself (the same node id: never declared dead), both replicas running, and a request answered
    through the node's own proxy. A node Ray declared dead is replaced for what follows, and the case fails."""
    cut = replica_worker(cluster)
    node_id = next(i for i, address in cluster.alive_nodes().items() if address == cut.address)
    with Load(cluster.head.address) as load:
        wait_for(lambda: load.succeeded() >= 10, 300, "the load to be served")
        cut.cut()
        cut_at = time.monotonic()
        try:
            time.sleep(cut_s)
        finally:
            cut.restore()
        restored_at = time.monotonic()
        try:
            wait_for(answering(lambda: cluster.alive_nodes().get(node_id) == cut.address), 120, "the node as itself")
        except RuntimeError:
            cut.kill()
            cluster.replace_lost(cut)
            raise
        alive_s = time.monotonic() - restored_at
        wait_for(answering(lambda: len(running_replicas(cluster)) == 2), 300, "both replicas running")
        running_s = time.monotonic() - restored_at
        wait_for(lambda: _answers(cut.address), 120, "the node's own proxy to answer")
        answering_s = time.monotonic() - restored_at
        load.served(20)
        answered = load.answered_between(cut_at, cut_at + cut_s)
    seconds = {"node alive as itself": alive_s, "both replicas running": running_s, "its proxy answering": answering_s}
    return Measured(seconds, load.requests(), load.failed(), answered)


def _answers(address: str) -> bool:
    try:
        return complete(address, "def answered():", timeout_s=30)["usage"]["completion_tokens"] > 0
    except OSError:
        return False


def restart_the_head(cluster: NamespaceCluster, down_s: float = HEAD_DOWN_S) -> Measured:
    """Ray's GCS fault tolerance (the head's tables in Redis on a machine of its own): four callers through a
    worker node's proxy; every process of the head killed, the head left down ``down_s``, then its Ray started
    again at the same address. Counted: requests answered while the head was down, requests failed (a request
    in flight to a replica on the head waits until the restarted GCS declares the old head dead), requests
    failed after the recovery, and Serve replicas on the head. Milestones, from the kill: the head's dashboard
    answering, Serve's applications running again, every node alive."""
    if cluster.redis is None:
        raise ValueError("a head restart keeps Serve's applications only with the GCS in Redis (redis=True)")
    applications = set(cluster.get("/api/serve/applications/")["applications"])
    worker = replica_worker(cluster)
    on_head = [r for r in serve_replicas(cluster) if r["state"] == "RUNNING" and r["node_ip"] == cluster.head.address]
    with Load(worker.address) as load:
        wait_for(lambda: load.succeeded() >= 10, 300, "the load to be served")
        killed_at = time.monotonic()
        cluster.head.kill()
        time.sleep(max(0.0, down_s - (time.monotonic() - killed_at)))
        answered = load.answered_between(killed_at, time.monotonic())  # nothing of the head ran in this window
        cluster.restart_head()
        head_s = time.monotonic() - killed_at

        def recovered() -> bool:
            now = cluster.get("/api/serve/applications/")["applications"]
            return set(now) == applications and all(app["status"] == "RUNNING" for app in now.values())

        wait_for(answering(recovered), 300, "the restarted head to recover the Serve applications")
        recovered_s = time.monotonic() - killed_at
        addresses = {node.address for node in cluster.nodes}
        wait_for(answering(lambda: cluster.alive_node_addresses() == addresses), 120, "every node alive")
        nodes_s = time.monotonic() - killed_at
        recovered_at = time.monotonic()
        load.served(20)
    seconds = {"head answering": head_s, "applications running": recovered_s, "every node alive": nodes_s}
    failed_after = sum(outcome != "200" and at >= recovered_at for at, outcome in load.timeline)
    return Measured(seconds, load.requests(), load.failed(), answered, failed_after=failed_after,
                    replicas_lost=len(on_head))  # fmt: skip


def lose_a_training_node(cluster: NamespaceCluster, storage: Path, run_name: str) -> Measured:
    """The train stage (three workers, one a node) submitted on a run whose data stage is done; the first worker
    node killed once training is past its first checkpoint, and started again once Ray has declared it dead.
    Milestones: declared dead, the node back, training's next step reported. The job must succeed."""
    lost = cluster.workers[0]
    _, submission = submit(cluster, storage, "train", run_name, *train_overrides(120), wait=False)
    run_dir = storage / run_name
    wait_for(lambda: len(steps(run_dir)) >= CHECKPOINT_EVERY + 2, JOB_S, "training past its first checkpoint")
    loss = kill_and_restart(cluster, lost)
    wait_for(lambda: lost.address in cluster.alive_node_addresses(), 300, "the node to be back")
    back_s = loss.since()
    final = cluster.job_ended(submission, JOB_S)
    if final["status"] != "SUCCEEDED":
        raise AssertionError(final)
    # A step all workers finished before the kill can still be collected after it, so the first step counted after
    # the loss is the first report carrying restart_load_s: the restored group's first, which says what its restore
    # cost.
    restored = [row for row in steps(run_dir) if row["reported_at"] > loss.lost_at and "restart_load_s" in row]
    if not restored:
        raise AssertionError("no restored group reported a step after the node's loss")
    progress_s = restored[0]["reported_at"] - loss.lost_at
    seconds = {"declared dead": loss.dead_s, "node back": back_s, "training progressing": progress_s}
    return Measured(seconds, requests=0, lost_at=loss.lost_at)
