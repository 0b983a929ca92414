"""A Ray cluster of several nodes on one machine: each node a network namespace with its own address on a
bridge, running its own ``ray start`` with Ray's token authentication; all of them share the machine's disk.

Needs root (``ip netns``, a bridge, veth pairs). Everything is named after this process's PID, so leftovers of
a test run that was killed are found and removed by the next one (:func:`remove_leftovers`). A node is stopped
by killing its own processes (``ip netns pids``): ``ray stop`` would stop every Ray process on the machine,
whatever its namespace.

Inside every namespace the node's link is called ``eth0``: gloo, which picks its interface by resolving the
host name, would otherwise choose an address of the machine that the other namespaces cannot reach, so the
nodes are started with ``GLOO_SOCKET_IFNAME=eth0`` (as an operator names the interface on multi-homed hosts).

With ``redis=True`` the head keeps its GCS's tables in a password-protected ``redis-server`` on a machine of its
own (one more namespace, no Ray): Ray's GCS fault tolerance, so a restarted head recovers the cluster's jobs,
actors and Serve applications while the worker nodes keep running (:meth:`NamespaceCluster.restart_head`).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT
from tests.helpers import system_tool, wait_for
from tests.ray.heads import dashboard_ready

PREFIX = "loomns"
LINK = "eth0"
RAY_PORT = 6379  # each namespace has its own ports: Ray's defaults are free in every one
DASHBOARD_PORT = 8265
SERVE_PORT = 8000
REDIS_PORT = 6379  # on the Redis machine, its own namespace


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([system_tool("ip"), *args], capture_output=True, text=True, check=check)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(namespace: str) -> None:
    for pid in _ip("netns", "pids", namespace, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def own_etc(namespace: str) -> Path:
    """Files that ``ip netns exec`` puts over /etc/ for the namespace's processes."""
    return Path("/etc/netns") / namespace


def remove_leftovers() -> None:
    """Namespaces and bridges of earlier test processes that are gone (a run killed before its clean-up)."""
    owners = re.compile(rf"^{PREFIX}(\d+)")
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        match = owners.match(name)
        if match and not _alive(int(match.group(1))):
            _kill_namespace_processes(name)
            _ip("netns", "del", name, check=False)
    for folder in Path("/etc/netns").glob(f"{PREFIX}*") if Path("/etc/netns").is_dir() else []:
        match = owners.match(folder.name)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
    for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        match = re.match(r"^lnb(\d+)$", name)
        if match and not _alive(int(match.group(1))):
            _ip("link", "del", name, check=False)


@dataclass
class Node:
    """One Ray node: its namespace, its address on the bridge, its host-side link, its ``ray start`` process."""

    namespace: str
    address: str
    host_link: str
    temp_dir: Path
    process: subprocess.Popen | None = None
    log: Path | None = None

    def pids(self) -> list[int]:
        return [int(pid) for pid in _ip("netns", "pids", self.namespace, check=False).stdout.split()]

    def kill(self) -> None:
        """Lose the node: SIGKILL every process in its namespace (what a machine's power loss leaves), and wait
        until all are gone (a process killed takes a moment to exit; Ray's `ray start` refuses to start a head
        while a GCS of the same address still runs)."""
        _kill_namespace_processes(self.namespace)
        if self.process is not None:
            self.process.wait(timeout=30)

        def gone() -> bool:  # killed again each time: a process born during the first pass goes too
            _kill_namespace_processes(self.namespace)
            return not self.pids()

        wait_for(gone, 60, f"every process of {self.namespace} to exit")

    def cut(self) -> None:
        _ip("link", "set", self.host_link, "down")

    def restore(self) -> None:
        _ip("link", "set", self.host_link, "up")

    def exec(self, *command: str) -> list[str]:
        """``command`` run inside this node's namespace."""
        return [system_tool("ip"), "netns", "exec", self.namespace, *command]

    def home_of_root(self, home: Path) -> None:
        """Make ``home`` the home directory of root for what runs in this namespace from now on.

        ``ip netns exec`` bind-mounts the files of /etc/netns/NAME/ over /etc/ for its processes: a passwd there
        names another home. Programs that read the home from the password database (OpenSSH's ``~``, as in the
        key path Ray's launcher gives the head's autoscaler) then use the test's folder, never /root.
        """
        lines = Path("/etc/passwd").read_text().splitlines()
        fields = [line.split(":") for line in lines]
        rewritten = [":".join([*f[:5], str(home), *f[6:]]) if f[0] == "root" else ":".join(f) for f in fields]
        own_etc(self.namespace).mkdir(parents=True, exist_ok=True)
        (own_etc(self.namespace) / "passwd").write_text("\n".join(rewritten) + "\n")


@dataclass
class Redis:
    """A password-protected ``redis-server`` on a machine of its own: the GCS's external store."""

    node: Node
    password: str

    @property
    def address(self) -> str:
        return f"{self.node.address}:{REDIS_PORT}"

    def _cli(self, *command: str) -> str:
        answer = subprocess.run(
            [system_tool("redis-cli"), "-h", self.node.address, "-p", str(REDIS_PORT), *command],
            capture_output=True, text=True, env={**os.environ, "REDISCLI_AUTH": self.password}, timeout=10,
        )  # fmt: skip
        return answer.stdout.strip()

    def ping(self) -> bool:
        return self._cli("ping") == "PONG"

    def keys(self) -> int:
        return int(self._cli("dbsize") or 0)


@contextmanager
def _redis(node: Node, folder: Path) -> Iterator[Redis]:
    """``redis-server`` in ``node``'s namespace, its password in its config file (never on a command line), its
    append-only file in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    redis = Redis(node, secrets.token_hex(24))
    config = folder / "redis.conf"
    config.write_text(
        f"bind {node.address}\nport {REDIS_PORT}\nrequirepass {redis.password}\nprotected-mode yes\n"
        f'dir {folder}\nappendonly yes\nsave ""\ndaemonize no\nlogfile {folder / "redis.log"}\n'
    )
    config.chmod(0o600)
    node.log = folder / "redis.log"
    node.process = subprocess.Popen(node.exec(system_tool("redis-server"), str(config)), stdout=subprocess.DEVNULL)
    _wait(redis.ping, 60, "Redis to answer", [node])
    yield redis


@dataclass
class NamespaceCluster:
    head: Node
    workers: list[Node]
    token: str
    env: dict[str, str]  # the nodes' environment; a client's too (token mode, the token, Loom's PATH)
    folder: Path
    worker_cpus: int
    head_cpus: int
    redis: Redis | None = None

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.address}:{DASHBOARD_PORT}"

    @property
    def gcs(self) -> str:
        return f"{self.head.address}:{RAY_PORT}"

    @property
    def nodes(self) -> list[Node]:
        return [self.head, *self.workers]

    def get(self, path: str, method: str = "GET") -> dict:
        """JSON from the head's dashboard (Ray's State, Jobs and Serve APIs), with the token."""
        request = urllib.request.Request(
            f"{self.dashboard}{path}", headers={"Authorization": f"Bearer {self.token}"}, method=method
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
        return json.loads(body) if body.strip() else {}

    def job(self, submission: str) -> dict:
        """A Ray job's record (status, job id) by its submission id."""
        return self.get(f"/api/jobs/{submission}")

    def job_ended(self, submission: str, timeout_s: float) -> dict:
        """The job's record once it succeeded, failed or was stopped."""
        wait_for(
            lambda: self.job(submission)["status"] in ("SUCCEEDED", "FAILED", "STOPPED"), timeout_s, "the job to end"
        )
        return self.job(submission)

    def job_tasks(self, job_id: str) -> list[dict]:
        """The job's tasks as the State API lists them (name, node id, state)."""
        found = self.get(
            f"/api/v0/tasks?limit=10000&detail=1&filter_keys=job_id&filter_predicates=%3D&filter_values={job_id}"
        )
        return found["data"]["result"]["result"]

    def job_actors(self, job_id: str, class_name: str) -> list[dict]:
        """The job's actors of one class as the State API lists them."""
        found = self.get(
            "/api/v0/actors?limit=1000&detail=1&filter_keys=job_id&filter_keys=class_name"
            f"&filter_predicates=%3D&filter_predicates=%3D&filter_values={job_id}&filter_values={class_name}"
        )
        return found["data"]["result"]["result"]

    def _nodes(self) -> list[dict]:
        return self.get("/api/v0/nodes?limit=100&detail=1")["data"]["result"]["result"]

    def node_addresses(self) -> dict[str, str]:
        """Every node Ray has known in this cluster, alive or dead: node id -> its address."""
        return {node["node_id"]: node["node_ip"] for node in self._nodes()}

    def alive_nodes(self) -> dict[str, str]:
        """Nodes the head's GCS lists as alive: node id -> address."""
        return {node["node_id"]: node["node_ip"] for node in self._nodes() if node["state"] == "ALIVE"}

    def alive_node_addresses(self) -> set[str]:
        return set(self.alive_nodes().values())

    def start_worker(self, node: Node, num_cpus: int) -> None:
        _start_ray(node, ["--address", self.gcs, f"--num-cpus={num_cpus}"], self.env)

    def start_head(self) -> None:
        flags = [
            "--head", f"--port={RAY_PORT}", f"--num-cpus={self.head_cpus}", f"--dashboard-host={self.head.address}",
            f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true",
        ]  # fmt: skip
        env = self.env
        if self.redis is not None:  # GCS fault tolerance: the tables in Redis, found again by a restarted head
            flags.append(f"--redis-password={self.redis.password}")
            env = {**env, "RAY_REDIS_ADDRESS": self.redis.address}
        _start_ray(self.head, flags, env)
        _wait(lambda: dashboard_ready(self.dashboard, self.token), 300, "the head's dashboard", self.nodes)

    def restart_head(self) -> None:
        """Start the head's Ray again after :meth:`Node.kill` of the head (same address, flags and store).

        The head's record of its last cluster (``ray_current_cluster`` in its Ray folder) goes first: `ray start
        --head` refuses to start when that address is also in a raylet's command line on this machine, which on
        one machine the worker nodes' raylets are (on separate machines they are not).
        """
        (self.head.temp_dir / "ray_current_cluster").unlink(missing_ok=True)
        self.start_head()

    def replace_lost(self, node: Node) -> None:
        """A lost worker node back: once Ray lists it dead, a new Ray node started at its address, until alive."""
        wait_for(lambda: node.address not in self.alive_node_addresses(), 120, "Ray to declare the node dead")
        self.start_worker(node, self.worker_cpus)
        wait_for(lambda: node.address in self.alive_node_addresses(), 300, "the node to be back")


def _start_ray(node: Node, flags: list[str], env: dict[str, str]) -> None:
    node.temp_dir.mkdir(parents=True, exist_ok=True)
    node.log = node.temp_dir.parent / f"{node.namespace}.log"
    with open(node.log, "a") as log:
        node.process = subprocess.Popen(
            node.exec(
                str(Path(sys.executable).parent / "ray"), "start", "--block", f"--node-ip-address={node.address}",
                f"--temp-dir={node.temp_dir}", "--disable-usage-stats", *flags,
            ),
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip


def _wait(condition, timeout_s: float, what: str, nodes: list[Node]) -> None:
    deadline = time.monotonic() + timeout_s  # a ceiling for a loaded 2-core machine, not an expectation
    while not condition():
        dead = [node for node in nodes if node.process is not None and node.process.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(f"--- {n.namespace}:\n{n.log.read_text()[-2000:]}" for n in nodes if n.log)
            raise RuntimeError(f"{what}: not within {timeout_s:.0f} s\n{logs}")
        time.sleep(1)


@contextmanager
def _network(folder: Path, count: int) -> Iterator[list[Node]]:
    pid = os.getpid()
    subnet = f"10.{100 + pid % 150}.{pid // 150 % 250}"
    bridge = f"lnb{pid}"
    nodes = [Node(f"{PREFIX}{pid}-{i}", f"{subnet}.{i + 2}", f"lnv{pid}-{i}", folder / f"n{i}") for i in range(count)]
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for node in nodes:
            _ip("netns", "add", node.namespace)
            _ip("link", "add", node.host_link, "type", "veth", "peer", "name", LINK, "netns", node.namespace)
            _ip("link", "set", node.host_link, "master", bridge, "up")
            _ip("-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", LINK)
            _ip("-n", node.namespace, "link", "set", LINK, "up")
            _ip("-n", node.namespace, "link", "set", "lo", "up")
        yield nodes
    finally:
        for node in nodes:
            _kill_namespace_processes(node.namespace)
            if node.process is not None:
                try:
                    node.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            _ip("netns", "del", node.namespace, check=False)
            shutil.rmtree(own_etc(node.namespace), ignore_errors=True)
        _ip("link", "del", bridge, check=False)


@contextmanager
def namespace_cluster(
    folder: Path,
    workers: int = 2,
    head_cpus: int = 2,
    worker_cpus: int = 2,
    extra_env: dict[str, str] | None = None,
    redis: bool = False,
) -> Iterator[NamespaceCluster]:
    """A head and ``workers`` worker nodes, each in its own namespace, token-authenticated, up and registered;
    with ``redis``, the head's GCS keeps its tables in a Redis on a machine of its own (fault tolerance).

    ``folder`` holds the nodes' Ray folders (short: Ray's socket paths must stay under 107 bytes) and logs.
    """
    if os.geteuid() != 0:
        raise RuntimeError("a namespace cluster needs root (ip netns, a bridge, veth pairs)")
    remove_leftovers()
    folder.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    home = folder / "home"
    home.mkdir(exist_ok=True)
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    env.update(
        HOME=str(home),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO_ROOT),
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        GLOO_SOCKET_IFNAME=LINK,
        **(extra_env or {}),
    )
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, folder, ignore_errors=True)  # after the nodes' processes are gone
        nodes = stack.enter_context(_network(folder, 1 + workers + (1 if redis else 0)))
        cluster = NamespaceCluster(nodes[0], nodes[1 : 1 + workers], token, env, folder, worker_cpus, head_cpus)
        if redis:
            cluster.redis = stack.enter_context(_redis(nodes[-1], folder / "redis"))
        cluster.start_head()
        for worker in cluster.workers:
            cluster.start_worker(worker, worker_cpus)
        addresses = {node.address for node in cluster.nodes}
        _wait(lambda: cluster.alive_node_addresses() == addresses, 300, "every node registered", cluster.nodes)
        yield cluster
