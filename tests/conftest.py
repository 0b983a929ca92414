"""Shared fixtures: recipes, free ports, and gpu-test skipping."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO_ROOT / "pipelines" / "recipes").glob("*.yaml"))
TINY = REPO_ROOT / "pipelines" / "recipes" / "tiny.yaml"
#: The tests' model and schedule: smaller than the demo's, so each training run in the tests stays quick.
SMALL_MODEL = [
    "train.model={hidden_size: 64, num_layers: 2, num_heads: 2, num_kv_heads: 2, intermediate_size: 256}",
    "train.micro_batch_size=8",
    "train.lr=3e-3",
    "train.warmup_steps=5",
]

# vLLM's CPU engine sizes its KV cache from this; keep tests small.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# vLLM's CPU binding ('auto') gives each engine's worker the last core of the machine's first NUMA node and reserves
# the rest: on a 2-core machine every engine of the tests runs on core 0 (their logs: "core ids=[0]"), the autoscaled
# replicas, the canary's two versions and the multi-node replicas alike. Unbound, the scheduler spreads them. Ray's
# processes (the Serve replicas and the engines they spawn) inherit this from the raylet the tests start.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def _ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


_HANDED_OUT: set[int] = set()  # a port given to one test is never given to another, bound yet or not
_CHOOSER = random.Random()  # its own generator: a test seeding `random` cannot make two picks collide


def free_port() -> int:
    """A loopback port that is free now and stays free until the test binds it, minutes later.

    A port the kernel hands out for port 0 comes from the ephemeral range, where every outgoing
    connection (and every Ray component that binds port 0) takes its local port: a run that binds
    only after its data, tune and train stages found one taken ("Failed to bind to address"). Ports
    between Ray's worker range (10002-19999) and the ephemeral range are assigned by nobody.
    """
    ephemeral = _ephemeral_ports()
    # Under pytest-xdist (make test runs the unit tests on every core) each worker process hands out its own share
    # of the range: _HANDED_OUT is per process, so two workers must never draw from the same ports.
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    candidates = [
        port
        for port in range(20000, 32768)
        if port % workers == worker and port not in ephemeral and port not in _HANDED_OUT
    ]
    start = _CHOOSER.randrange(len(candidates))
    for port in candidates[start:] + candidates[:start]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port between 20000 and the ephemeral range")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip_gpu)


#: Shared fixtures (package or module scope) that took longer than this to set up, listed at the end of a run:
#: pytest's --durations charges them to whichever test asked first, which hides what the suite's time goes to.
SLOW_FIXTURE_S = 20
_FIXTURE_SECONDS: list[tuple[float, str]] = []


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    import time

    started = time.monotonic()
    try:
        return (yield)
    finally:
        seconds = time.monotonic() - started
        if fixturedef.scope != "function" and seconds > SLOW_FIXTURE_S:
            _FIXTURE_SECONDS.append(
                (seconds, f"{fixturedef.scope} fixture {fixturedef.argname} ({request.node.nodeid})")
            )


def pytest_terminal_summary(terminalreporter):
    if _FIXTURE_SECONDS:
        terminalreporter.write_sep("=", f"shared fixtures slower than {SLOW_FIXTURE_S} s to set up (own time)")
        for seconds, what in sorted(_FIXTURE_SECONDS, reverse=True):
            terminalreporter.write_line(f"{seconds:8.1f}s {what}")


#: Processes a test may start and must stop: a Ray node's (its workers are named ``ray::...``), vLLM's engine, the
#: servers the tests drive. Listed when one outlives the folder of tests that started it.
_SERVICE_PATTERN = (
    "raylet", "gcs_server", "ray::", "ray/dashboard", "log_monitor", "EngineCore", "vllm", "prometheus",
    "redis-server", "chromium",
)  # fmt: skip
_FOLDER_STARTED: dict[str, float] = {}


def _folder(nodeid: str) -> str:
    """The test's folder under tests/ (tests/e2e, tests/multinode, tests/ray, ...)."""
    parts = nodeid.split("/")
    return "/".join(parts[:2]) if len(parts) > 2 else parts[0]


def _services_running() -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # it ended meanwhile
            continue
        if command and any(pattern in command for pattern in _SERVICE_PATTERN):
            found.append(f"{entry.name} {command[:120]}")
    return found


def pytest_runtest_logstart(nodeid, location):
    import time

    _FOLDER_STARTED.setdefault(_folder(nodeid), time.monotonic())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """At the end of each folder of tests (its package fixtures torn down): its wall time, the machine's load, and
    every Ray, vLLM or server process still running. A process one folder left behind takes CPU from every test
    after it (on CI's two cores, minutes of make test) and can hold the ports and names the next folder needs."""
    import time

    try:
        return (yield)
    finally:
        folder = _folder(item.nodeid)
        if nextitem is None or _folder(nextitem.nodeid) != folder:
            reporter = item.config.pluginmanager.get_plugin("terminalreporter")
            give_up = time.monotonic() + 15  # a cluster shut down a moment ago is still exiting
            while (left := _services_running()) and time.monotonic() < give_up:
                time.sleep(1)
            seconds = time.monotonic() - _FOLDER_STARTED.get(folder, time.monotonic())  # the wait included
            if reporter is not None:
                load = Path("/proc/loadavg").read_text().split()[:3]
                reporter.write_line(
                    f"\n[tests] {folder} took {seconds:.0f} s; load average {' '.join(load)}; "
                    f"{len(left)} Ray, vLLM or server processes left running"
                )
                for line in left[:20]:
                    reporter.write_line(f"[tests]   {line}")
