"""`ray up cluster/onprem.yaml` for real: three machines of one's own, each a network namespace on a bridge with
an sshd of its own (tests/netns.py, tests/sshd.py). Ray's launcher reaches the head over SSH, starts it, and the
head's autoscaler reaches both workers over SSH and starts them; the three nodes serve a job; `ray down` stops
them.

The launcher config is cluster/onprem.yaml with the namespaces' addresses, the test's key and one Ray folder per
node (all three share this machine's /tmp). Its `ray stop` before each `ray start` is left out here: on one
machine it stops every Ray process of the user, whichever namespace (a worker's would stop the head). `ray down`
runs it anyway, once, at the end, so the test first waits until no other Ray runs (make test runs it after the
local `loom run` test, before the namespace and Ray tests' clusters start).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.e2e.test_ray_up import RAY, TOKEN, other_ray_running, ray_down, run
from tests.helpers import system_tool, wait_for
from tests.netns import _network
from tests.ray.heads import env_without_ray_settings
from tests.sshd import private_sshd

pytestmark = pytest.mark.e2e


def onprem_yaml_for_test(head: str, workers: list[str], user: str, key: Path, ray_temp: Path) -> dict:
    """cluster/onprem.yaml with these addresses, user, key and per-node Ray folders; its `ray stop` left out."""
    config = yaml.safe_load((REPO_ROOT / "cluster" / "onprem.yaml").read_text())
    template_head = config["provider"]["head_ip"]
    config["cluster_name"] = f"loom-onprem-test-{uuid.uuid4().hex[:8]}"
    config["provider"] |= {"head_ip": head, "worker_ips": workers}
    config["max_workers"] = len(workers)
    config["auth"] = {"ssh_user": user, "ssh_private_key": str(key)}
    node_temp = f"--temp-dir={ray_temp}/$(ip -o route get {head} | sed -n 's/.* src \\([0-9.]*\\).*/\\1/p')"
    for key_name in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = []
        for command in config[key_name]:
            command = command.replace(template_head, head)
            if "ray start" in command:
                command = command.replace("ray stop &&", "")
                command += f" {node_temp}" if key_name == "worker_start_ray_commands" else f" --temp-dir={ray_temp}/h"
            commands.append(command)
        config[key_name] = commands
    return config


def test_ray_up_of_three_machines_over_ssh_then_a_job_runs_on_every_node(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the namespaces need root")
    system_tool("redis-server")  # the config's head starts one (skipped without it here; CI installs it)
    deadline = time.monotonic() + 60
    while other_ray_running():
        assert time.monotonic() < deadline, "another Ray runs as this user: `ray down` would stop it; stop it first"
        time.sleep(1)
    temp = Path(tempfile.mkdtemp(prefix="lup-", dir="/tmp"))  # short: Ray's socket paths
    local_home = temp / "local"
    (local_home / ".ray").mkdir(parents=True)
    (local_home / ".ray" / "auth_token").write_text(TOKEN)
    (local_home / ".ray" / "auth_token").chmod(0o600)
    redis_password = secrets.token_hex(24)
    (local_home / ".ray" / "redis_password").write_text(redis_password)
    (local_home / ".ray" / "redis_password").chmod(0o600)
    env = env_without_ray_settings(local_home)
    venv = Path(sys.executable).parent.parent
    bashrc = f"source {venv}/bin/activate\nexport PYTHONPATH={REPO_ROOT}\n"
    try:
        with ExitStack() as stack:
            nodes = stack.enter_context(_network(temp / "nodes", 3))
            head, workers = nodes[0], nodes[1:]
            sshds = []
            for node in nodes:  # one sshd a machine, with the same keys (one login for the launcher)
                node.home_of_root(temp / "remote")  # the head's autoscaler finds its key under "~"
                sshds.append(
                    stack.enter_context(
                        private_sshd(
                            temp / f"sshd-{node.address}", temp / "remote", bashrc, address=node.address, port=22,
                            inside=node.exec(), keys_from=temp / f"sshd-{head.address}" if sshds else None,
                        )
                    )
                )  # fmt: skip
            config_path = temp / "onprem.yaml"
            config = onprem_yaml_for_test(
                head.address, [w.address for w in workers], sshds[0].user, sshds[0].client_key, temp / "ray"
            )
            config_path.write_text(yaml.safe_dump(config))
            try:
                # Autoscaler v1: v2 counts the head as one of the local provider's nodes and starts a worker too few.
                up_env = {**env, "RAY_UP_enable_autoscaler_v2": "0"}
                run([RAY, "up", "-y", "--no-config-cache", str(config_path)], up_env, 900, "ray up")
                dashboard = f"http://{head.address}:8265"
                job_env = {**env, "RAY_AUTH_MODE": "token"}

                def alive_nodes() -> set[str]:
                    request = urllib.request.Request(
                        f"{dashboard}/api/v0/nodes?limit=100&detail=1", headers={"Authorization": f"Bearer {TOKEN}"}
                    )
                    with urllib.request.urlopen(request, timeout=30) as response:
                        listed = json.load(response)["data"]["result"]["result"]
                    return {node["node_ip"] for node in listed if node["state"] == "ALIVE"}

                def three_nodes() -> bool:
                    return alive_nodes() == {node.address for node in nodes}

                # The head's autoscaler starts the workers after `ray up` returns: its own SSH, its own pace.
                wait_for(three_nodes, 600, "the head's autoscaler to start both workers")
                # One bundle a node (STRICT_SPREAD), a task in each: deterministic, unlike SPREAD's best effort.
                script = (
                    "import ray; from ray.util.placement_group import placement_group; "
                    "from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy as In; ray.init(); "
                    "pg = placement_group([{'CPU': 1}] * 3, strategy='STRICT_SPREAD'); ray.get(pg.ready(), timeout=300); "
                    "f = ray.remote(num_cpus=1)(lambda: ray.util.get_node_ip_address()); "
                    "print('NODES', sorted(set(ray.get([f.options(scheduling_strategy=In(pg, i)).remote() "
                    "for i in range(3)]))))"
                )
                job = run(
                    [RAY, "job", "submit", "--address", dashboard, "--", "python", "-c", script],
                    job_env, 600, "ray job submit",
                )  # fmt: skip
                found = re.search(r"NODES \[(.*?)\]", job)
                assert found, job[-3000:]
                assert {address.strip(" '") for address in found.group(1).split(",")} == {
                    node.address for node in nodes
                }, job[-3000:]
                assert (sshds[0].remote_home / ".ray" / "auth_token").read_text() == TOKEN
                # The head's GCS keeps its tables in the password-protected Redis the config started beside it
                # (on the head's loopback).
                redis_cli = head.exec(system_tool("redis-cli"), "-h", "127.0.0.1", "-p", "6380", "dbsize")
                stored = subprocess.run(
                    redis_cli, capture_output=True, text=True, env={**os.environ, "REDISCLI_AUTH": redis_password},
                    timeout=30,
                )  # fmt: skip
                assert int(stored.stdout.strip() or 0) > 0, stored.stdout + stored.stderr
                refused = subprocess.run(redis_cli, capture_output=True, text=True, timeout=30)
                assert "NOAUTH" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
            finally:
                ray_down(config_path, env, config["cluster_name"])
            # `ray down` stopped every node: no Ray process is left in any namespace (sshd aside).
            wait_for(lambda: not other_ray_running(), 120, "ray down to stop every node")
    finally:
        shutil.rmtree(temp, ignore_errors=True)
