"""A head started the way cluster.yaml starts it refuses clients without Ray's token, speaks TLS, keeps its GCS's
tables in the password-protected Redis that cluster.yaml's own command starts, and runs the stage `loom submit`
sends it.

The head runs beside the tests' embedded cluster, in its own temporary folder, HOME and ports
(tests/ray/heads.py, which stops it by PID); the token and the Redis password sit where cluster.yaml's
file_mounts put them (~/.ray/), and the TLS certificates come from a CA made here (trustme). Redis listens on
the loopback port cluster.yaml names (6380) and is shut down after the module.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, TINY
from tests.helpers import system_tool
from tests.ray.heads import env_without_ray_settings, second_head

pytestmark = pytest.mark.ray

TOKEN = "loom-test-token-" + "0123456789abcdef" * 2


#: How cluster.yaml's head start command reads the Redis password (from the file file_mounts copies).
PASSWORD_FROM_FILE = "$(cat ~/.ray/redis_password)"
REDIS_PORT = "6380"  # cluster.yaml's


def cluster_yaml_head_command() -> tuple[str, dict[str, str], list[str]]:
    """cluster.yaml's command that starts the GCS's Redis, and the environment assignments and the ``ray start``
    argv of its head start command."""
    commands = yaml.safe_load((REPO_ROOT / "cluster.yaml").read_text())["head_start_ray_commands"]
    (redis,) = [command for command in commands if "redis-server" in command]
    (start,) = [command for command in commands if "ray start" in command]
    words = shlex.split(start.split("&&")[-1])
    env = dict(word.split("=", 1) for word in words if "=" in word and not word.startswith("-"))
    argv = [word for word in words if "=" not in word or word.startswith("-")]
    return redis, env, argv


def redis_cli(password: str | None, *command: str) -> subprocess.CompletedProcess:
    auth = {"REDISCLI_AUTH": password} if password else {}
    return subprocess.run(
        [system_tool("redis-cli"), "-h", "127.0.0.1", "-p", REDIS_PORT, *command],
        capture_output=True, text=True, timeout=30, env={**os.environ, **auth},
    )  # fmt: skip


@dataclass
class Head:
    gcs: str
    dashboard: str
    home: Path
    tls_env: dict[str, str]
    ca_file: Path
    redis_password: str


@pytest.fixture(scope="module")
def secured_head():
    import trustme
    from ray.util import get_node_ip_address

    redis, env, argv = cluster_yaml_head_command()
    assert env.get("RAY_AUTH_MODE") == "token", "cluster.yaml's head must start with RAY_AUTH_MODE=token"
    system_tool("redis-server")
    temp = Path(tempfile.mkdtemp(prefix="loom-auth-", dir="/tmp"))  # short: Ray's socket paths
    home = temp / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(TOKEN)  # where cluster.yaml's file_mounts put it
    password = secrets.token_hex(24)
    (home / ".ray" / "redis_password").write_text(password)
    # cluster.yaml's own command, as the launcher runs it on the head: writes redis' config, starts it, waits.
    started = subprocess.run(
        ["bash", "-c", redis], env={**os.environ, "HOME": str(home)}, capture_output=True, text=True, timeout=120
    )
    assert started.returncode == 0, started.stdout + started.stderr
    argv = [word.replace(PASSWORD_FROM_FILE, password) for word in argv]
    ca = trustme.CA()
    node = ca.issue_cert("127.0.0.1", get_node_ip_address(), "localhost")
    ca_file, cert_file, key_file = temp / "ca.crt", temp / "node.crt", temp / "node.key"
    ca.cert_pem.write_to_path(str(ca_file))
    node.cert_chain_pems[0].write_to_path(str(cert_file))
    node.private_key_pem.write_to_path(str(key_file))
    tls_env = {
        "RAY_USE_TLS": "1",
        "RAY_TLS_SERVER_CERT": str(cert_file),
        "RAY_TLS_SERVER_KEY": str(key_file),
        "RAY_TLS_CA_CERT": str(ca_file),
    }
    # cluster.yaml's flags, less the ports and the launcher's autoscaling config, which this head chooses.
    skipped = ("--head", "--port", "--autoscaling-config")
    flags = [word for word in argv[2:] if word.split("=")[0] not in skipped] + ["--num-cpus=4"]
    # As on a cluster node, Loom's environment comes first on PATH: a job's `python` is the head's.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    head_env = env_without_ray_settings(home, PATH=path, **env, **tls_env)
    try:
        with second_head(flags, head_env, TOKEN, temp / "ray") as head:
            yield Head(
                gcs=head.gcs, dashboard=head.dashboard, home=home, tls_env=tls_env, ca_file=ca_file,
                redis_password=password,
            )  # fmt: skip
    finally:
        redis_cli(password, "shutdown", "nosave")


def run(argv: list[str], env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def submitted(argv: list[str], env: dict[str, str], wait_s: float = 120) -> subprocess.CompletedProcess:
    """``run``, again while the head says its job agent is not registered yet (it comes up after the dashboard)."""
    deadline = time.monotonic() + wait_s
    while True:
        done = run(argv, env)
        if "try again later" not in done.stdout + done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(1)


def test_job_submission_without_the_token_is_refused_and_with_it_runs(secured_head, tmp_path):
    ray = str(Path(sys.executable).parent / "ray")
    job = [ray, "job", "submit", "--address", secured_head.dashboard, "--", "python", "-c", "print('job ran')"]
    refused = run(job, env_without_ray_settings(tmp_path))  # a HOME without ~/.ray/auth_token
    assert refused.returncode != 0
    assert "Authentication required" in refused.stdout + refused.stderr
    assert "job ran" not in refused.stdout
    # The README's line: the token at ~/.ray/auth_token, and RAY_AUTH_MODE=token on the client.
    accepted = submitted(job, env_without_ray_settings(secured_head.home, RAY_AUTH_MODE="token"))
    assert accepted.returncode == 0, accepted.stdout[-2000:] + accepted.stderr[-2000:]
    assert "job ran" in accepted.stdout


def test_loom_submit_finds_the_token_where_ray_keeps_it_and_the_stage_runs(secured_head, tmp_path):
    from cluster.auth import enable_client_token

    environ = env_without_ray_settings(secured_head.home)
    assert enable_client_token(environ) == str(secured_head.home / ".ray" / "auth_token")
    result = run(
        [sys.executable, "-m", "cluster", "submit", "data", str(TINY),
         f"storage={tmp_path}", "run_name=submitted", "data.max_documents=40", "data.vocab_size=512",
         "--address", secured_head.dashboard],
        environ, timeout=900,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "SUCCEEDED" in output and "python -m pipelines.data --config pipelines/recipes/tiny.yaml" in output
    run_dir = tmp_path / "submitted"
    assert (run_dir / "data" / "_COMPLETE").is_file()
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert stats["documents_in"] == 40 and stats["sequences"]["train"] > 0


def test_ray_init_without_the_token_is_refused_and_with_it_connects(secured_head, tmp_path):
    connect = [sys.executable, "-c", f"import ray; ray.init(address={secured_head.gcs!r}); print('connected')"]
    refused = run(connect, env_without_ray_settings(tmp_path, **secured_head.tls_env))
    assert refused.returncode != 0 and "connected" not in refused.stdout
    assert "InvalidAuthToken" in refused.stdout + refused.stderr
    accepted = run(connect, env_without_ray_settings(secured_head.home, RAY_AUTH_MODE="token", **secured_head.tls_env))
    assert accepted.returncode == 0, accepted.stderr[-2000:]
    assert "connected" in accepted.stdout


def test_the_heads_grpc_port_speaks_tls_with_the_clusters_certificate(secured_head):
    host, port = secured_head.gcs.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with ssl.create_default_context(cafile=str(secured_head.ca_file)).wrap_socket(raw, server_hostname=host) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):  # not a certificate the system trusts: the test CA's
            ssl.create_default_context().wrap_socket(raw, server_hostname=host)


def test_the_heads_gcs_keeps_its_tables_in_the_redis_cluster_yaml_starts(secured_head):
    """GCS fault tolerance: the tables a restarted head recovers are in Redis, which asks for the password."""
    stored = redis_cli(secured_head.redis_password, "dbsize")
    assert int(stored.stdout.strip() or 0) > 0, stored.stdout + stored.stderr
    refused = redis_cli(None, "dbsize")
    assert "NOAUTH" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    mode = (secured_head.home / "loom-redis" / "redis.conf").stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)  # the config holds the password
