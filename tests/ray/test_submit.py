"""`loom submit` against a real head started with `ray start --head`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, TINY, free_port

pytestmark = pytest.mark.ray


@pytest.fixture
def auth_env():
    """Ray 2.60 clusters use token authentication: the head and `loom submit` share a token.

    The job's `python` is the head's: as on a cluster node, Loom's environment comes first on PATH.
    """
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    token = secrets.token_hex(32)
    return {**os.environ, "PATH": path, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def _dashboard_ready(address: str, token: str) -> bool:
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture
def ray_head(auth_env):
    ray_bin = Path(sys.executable).parent / "ray"
    port, dashboard_port = free_port(), free_port()
    # The package's embedded Ray already holds Ray's default agent ports (52365 and others) on
    # this machine: a second node on the defaults starts without a job agent and every
    # submission waits forever. Each of its listening ports gets a free one.
    own_ports = [
        f"--{flag}={free_port()}"
        for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                     "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    ]  # fmt: skip
    # A short temp dir: Ray's socket paths must stay under the 107-byte limit.
    temp_dir = Path(f"/tmp/loom-head-{os.getpid()}")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--temp-dir={temp_dir}",
         "--include-dashboard=true", "--disable-usage-stats", *own_ports],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=auth_env,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.monotonic() + 180
        while not _dashboard_ready(address, auth_env["RAY_AUTH_TOKEN"]):
            if time.monotonic() > deadline or head.poll() is not None:
                head.kill()
                raise RuntimeError(f"ray head did not come up:\n{head.stdout.read()[-3000:]}")
            time.sleep(2)
        yield address
    finally:
        head.terminate()  # --block: ray start stops the node's processes when it exits
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_submit_data_stage_to_a_real_head(ray_head, auth_env, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "submit", "data", str(TINY),
         f"storage={tmp_path}", "run_name=submitted", "data.max_documents=40", "data.vocab_size=512",
         "--address", ray_head],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=auth_env,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "SUCCEEDED" in output and "python -m pipelines.data --config pipelines/recipes/tiny.yaml" in output
    run_dir = tmp_path / "submitted"
    assert (run_dir / "data" / "_COMPLETE").is_file()
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert stats["documents_in"] == 40 and stats["sequences"]["train"] > 0
