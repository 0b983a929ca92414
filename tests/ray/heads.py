"""A second Ray head beside the tests' embedded cluster: its own ports, folder and token, stopped by PID."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO_ROOT, free_port

#: Ports Ray gives defaults that the embedded cluster already holds (52365 and others): a second node on the
#: defaults starts without a job agent and every submission waits forever. Each gets a free port.
OWN_PORT_FLAGS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
)


def env_without_ray_settings(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without its Ray settings (the embedded cluster's token mode), ``HOME`` at
    ``home`` (so ``~/.ray/auth_token`` is that folder's), and ``extra``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    return {**env, "HOME": str(home), "PYTHONPATH": str(REPO_ROOT), **extra}


@dataclass
class RunningHead:
    gcs: str
    dashboard: str


def dashboard_ready(address: str, token: str) -> bool:
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def second_head(flags: list[str], env: dict[str, str], token: str, temp_dir: Path) -> Iterator[RunningHead]:
    """``ray start --head --block`` with ``flags`` (no port flags), up once its dashboard takes ``token``.

    ``temp_dir`` must be short: Ray's socket paths must stay under the 107-byte limit.
    """
    port, dashboard_port = free_port(), free_port()
    own_ports = [f"--{flag}={free_port()}" for flag in OWN_PORT_FLAGS]
    # Stopped with SIGTERM below: Ray drains the node first, for up to 30 s while anything holds a lease (in the
    # auth tests' teardown it waited all 30 s); a drain is for Serve replicas behind live proxies, none here.
    env = {**env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}", *flags, *own_ports],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 300  # a ceiling for a loaded machine, not an expectation
        while not dashboard_ready(address, token):
            if time.monotonic() > deadline or head.poll() is not None:
                head.kill()
                raise RuntimeError(f"ray head did not come up:\n{head.stdout.read()[-3000:]}")
            time.sleep(2)
        yield RunningHead(gcs=f"127.0.0.1:{port}", dashboard=address)
    finally:
        head.terminate()  # --block: ray start stops the node's processes when it exits
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
