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
    candidates = [port for port in range(20000, 32768) if port not in ephemeral and port not in _HANDED_OUT]
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
