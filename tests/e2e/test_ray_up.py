"""`ray up cluster/local.yaml` for real: Ray's cluster launcher brings up this machine as a head over SSH on
loopback; `ray exec` runs on it; `ray job submit` runs `loom run` there; the endpoint answers the openai
client; Prometheus (as `loom monitor` starts it) scrapes the cluster; `ray down` stops it.

The job's run starts from a copy of test_loom_run.py's (tests/e2e/conftest.py), as a run moved to a new cluster
does: its `loom run` skips the stages complete under the same keys and serves. (Alone, the test's job runs every
stage.) The stages' own work on a remote cluster: tests/multinode/test_chain_across_nodes.py.

The SSH server is the test's own (tests/sshd.py), on a free loopback port that Ray reaches through
``auth.ssh_proxy_command``. The launcher config is cluster/local.yaml with the test's ports, folders and
key. `ray down` runs `ray stop` on the head, which stops every Ray process of this user on this machine:
the test first waits until no other Ray runs (make test runs it after the local `loom run` test, before
the Ray tests' cluster starts).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, free_port
from tests.e2e.conftest import CHAIN, RUN_NAME
from tests.helpers import wait_for
from tests.metrics import PrometheusServer
from tests.ray.heads import OWN_PORT_FLAGS, env_without_ray_settings
from tests.sshd import private_sshd

pytestmark = pytest.mark.e2e

TOKEN = "loom-launcher-test-token-" + "0123456789abcdef" * 2
RAY = str(Path(sys.executable).parent / "ray")


def other_ray_running() -> bool:
    return subprocess.run(["pgrep", "-u", str(os.getuid()), "raylet"], capture_output=True).returncode == 0


#: How `ray down` fails when the local provider's state file is empty: Ray's ClusterState truncates the file, then
#: writes it, and `ray down` stops the head (its autoscaler too) before reading it. On one machine the head's
#: autoscaler writes the same /tmp/ray/cluster-NAME.state as this launcher, and a stop that lands between the two
#: leaves the file empty (seen once in a fresh clone, after "Stopped all 6 Ray processes"). Machines of their own
#: keep a state file each.
TRUNCATED_STATE = re.compile(r"local/node_provider\.py.*\n.*json\.loads\(open\(self\.save_path\)\.read\(\)\)")


def ray_down(config_path: Path, env: dict[str, str], cluster_name: str) -> None:
    """`ray down -y`, then the local provider's record removed; fails unless the head was stopped, accepting the
    empty state file only after the head's processes were (TRUNCATED_STATE)."""
    down = subprocess.run([RAY, "down", "-y", str(config_path)], env=env, capture_output=True, text=True, timeout=300)
    for suffix in (".state", ".lock"):  # the local provider's record, in Ray's default temp folder
        Path(f"/tmp/ray/cluster-{cluster_name}{suffix}").unlink(missing_ok=True)
    output = down.stdout + down.stderr
    empty_state_after_stop = (
        "Stopped all" in output and "JSONDecodeError" in output and TRUNCATED_STATE.search(output) is not None
    )
    assert down.returncode == 0 or empty_state_after_stop, output


def local_yaml_for_test(sshd, ray_temp: Path, ports: dict[str, int]) -> dict:
    """cluster/local.yaml with this test's key, proxy command, ports and Ray folder; nothing else changed."""
    config = yaml.safe_load((REPO_ROOT / "cluster" / "local.yaml").read_text())
    config["cluster_name"] = f"loom-test-{uuid.uuid4().hex[:8]}"
    config["auth"] = {
        "ssh_user": sshd.user,
        "ssh_private_key": str(sshd.client_key),
        "ssh_proxy_command": sshd.proxy_command,
    }
    commands = config["head_start_ray_commands"]
    index = next(i for i, command in enumerate(commands) if "ray start" in command)
    start = commands[index]
    for flag, port in ports.items():
        start, replaced = re.subn(rf"--{flag}=\d+", f"--{flag}={port}", start)
        if not replaced:
            start += f" --{flag}={port}"
    commands[index] = start + f" --temp-dir={ray_temp}"
    return config


def run(command: list[str], env: dict[str, str], timeout: float, what: str) -> str:
    result = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{what} failed (exit {result.returncode}):\n{output[-6000:]}"
    return output


def test_ray_up_on_loopback_then_a_job_runs_the_chain_and_the_endpoint_and_prometheus_answer(e2e_storage):
    import openai

    deadline = time.monotonic() + 60
    while other_ray_running():  # the local `loom run` test's Ray may still be exiting
        assert time.monotonic() < deadline, "another Ray runs as this user: `ray down` would stop it; stop it first"
        time.sleep(1)
    temp = Path(tempfile.mkdtemp(prefix="loom-up-", dir="/tmp"))  # short: Ray's socket paths
    ray_temp, storage = temp / "ray", temp / "runs"
    trained = e2e_storage / RUN_NAME
    moved = (trained / "manifest.json").is_file()
    if moved:
        shutil.copytree(trained, storage / "launcher", ignore=shutil.ignore_patterns("report"))  # the job writes one
    local_home = temp / "local"
    (local_home / ".ray").mkdir(parents=True)
    (local_home / ".ray" / "auth_token").write_text(TOKEN)
    (local_home / ".ray" / "auth_token").chmod(0o600)
    env = env_without_ray_settings(local_home)
    ports = {"port": free_port(), "dashboard-port": free_port(), "metrics-export-port": free_port()}
    ports |= {flag: free_port() for flag in OWN_PORT_FLAGS if flag not in ports}
    serve_port = free_port()
    venv = Path(sys.executable).parent.parent
    with private_sshd(temp / "sshd", temp / "remote", bashrc=f"source {venv}/bin/activate\n") as sshd:
        config_path = temp / "local.yaml"
        config_path.write_text(yaml.safe_dump(local_yaml_for_test(sshd, ray_temp, ports)))
        try:
            run([RAY, "up", "-y", "--no-config-cache", str(config_path)], env, 600, "ray up")
            # The launcher copied the token where file_mounts says, on the head's side.
            assert (sshd.remote_home / ".ray" / "auth_token").read_text() == TOKEN
            status = run([RAY, "exec", str(config_path), "RAY_AUTH_MODE=token ray status"], env, 300, "ray exec")
            assert "Active:" in status and "8.0 CPU" in status, status[-3000:]

            dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
            job_env = {**env, "RAY_AUTH_MODE": "token"}
            job = run(
                [RAY, "job", "submit", "--address", dashboard, "--working-dir", ".", "--",
                 "python", "-m", "cluster", "run", "pipelines/recipes/tiny.yaml",
                 f"storage={storage}", "run_name=launcher", f"serve.port={serve_port}", *CHAIN],
                job_env, 1500, "ray job submit of loom run",
            )  # fmt: skip
            assert "succeeded" in job and "[loom] the application stays deployed at" in job, job[-4000:]
            if moved:  # the moved run's stages were not done again
                redone = [
                    stage
                    for stage in ("data", "tune", "train", "eval")
                    if f"[loom] {stage}: already complete" not in job
                ]
                assert not redone, (redone, job[-4000:])
            assert (storage / "launcher" / "report" / "index.html").is_file()

            client = openai.OpenAI(base_url=f"http://127.0.0.1:{serve_port}/v1", api_key="unused")
            completion = client.completions.create(
                model="loom-tiny", prompt="def", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
            )
            assert completion.usage.completion_tokens == 8

            prometheus = PrometheusServer(temp / "prometheus", str(ray_temp / "session_latest"), free_port())
            try:
                wait_for(prometheus.ready, 60, "Prometheus to be ready")

                def answered_requests_scraped() -> bool:
                    client.completions.create(model="loom-tiny", prompt="x", max_tokens=2)
                    query = 'sum(ray_loom_serve_requests_total{status="200"})'
                    return bool(prometheus.api("query", query=query)["result"])

                wait_for(answered_requests_scraped, 120, "the endpoint's request counter in Prometheus")
                targets = prometheus.api("targets")["activeTargets"]
                assert any(
                    f":{ports['metrics-export-port']}" in t["scrapeUrl"] and t["health"] == "up" for t in targets
                )
            finally:
                prometheus.stop()
        finally:
            ray_down(config_path, env, yaml.safe_load(config_path.read_text())["cluster_name"])
    wait_for(lambda: not other_ray_running(), 60, "ray down to stop the head's processes")
    shutil.rmtree(temp, ignore_errors=True)
