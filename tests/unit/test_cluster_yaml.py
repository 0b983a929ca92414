"""cluster.yaml as `ray up` reads it, with token authentication on every node; and where clients find the token."""

from __future__ import annotations

import pytest
import yaml

from cluster.auth import enable_client_token, token_source, warn_if_embedded_unauthenticated
from tests.conftest import REPO_ROOT

#: The GPU cluster, one machine over loopback SSH, and machines of one's own (head and workers at fixed addresses).
LAUNCHER_CONFIGS = ["cluster.yaml", "cluster/local.yaml", "cluster/onprem.yaml"]


def cluster_yaml(path: str = "cluster.yaml") -> dict:
    return yaml.safe_load((REPO_ROOT / path).read_text())


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
def test_cluster_yaml_passes_ray_ups_own_validation_and_a_typo_is_refused(path):
    from jsonschema.exceptions import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cluster_yaml(path)))  # what `ray up` runs before it launches anything
    typo = cluster_yaml(path)
    typo["head_start_ray_comands"] = typo.pop("head_start_ray_commands")
    with pytest.raises(ValidationError, match="head_start_ray_comands"):
        validate_config(prepare_config(typo))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS)
def test_every_node_starts_ray_with_token_authentication_and_gets_the_token(path):
    config = cluster_yaml(path)
    has_workers = config["max_workers"] > 0
    for key in ("head_start_ray_commands", "worker_start_ray_commands")[: 1 + has_workers]:
        starts = [command for command in config[key] if "ray start" in command]
        assert starts and all("RAY_AUTH_MODE=token" in command for command in starts), key
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    head = next(command for command in config["head_start_ray_commands"] if "ray start" in command)
    if config["provider"]["type"] == "local" and config["provider"]["worker_ips"]:
        # Machines of one's own: the job API on the head's address for the workers' network, behind the token.
        assert f"--dashboard-host={config['provider']['head_ip']}" in head
        assert f"--node-ip-address={config['provider']['head_ip']}" in head
        assert config["max_workers"] == len(config["provider"]["worker_ips"])
    else:
        assert "--dashboard-host=127.0.0.1" in head  # the job API is reached through `ray dashboard cluster.yaml`


@pytest.mark.parametrize("path", ["cluster.yaml", "cluster/onprem.yaml"])
def test_the_head_keeps_its_gcs_in_a_password_protected_redis_on_its_loopback(path):
    """GCS fault tolerance (a restarted head recovers jobs, actors and Serve's applications): the head starts a
    Redis that asks for the password the launcher copied (read from its file, never written in the config) and
    listens on loopback only, and Ray's head uses it."""
    config = cluster_yaml(path)
    assert config["file_mounts"]["~/.ray/redis_password"] == "~/.ray/redis_password"
    commands = config["head_start_ray_commands"]
    redis = next(command for command in commands if "redis-server" in command)
    assert "requirepass %s" in redis and '"$(cat ~/.ray/redis_password)"' in redis
    assert "bind %s" in redis and " 127.0.0.1 " in redis and "umask 077" in redis
    head = next(command for command in commands if "ray start" in command)
    assert commands.index(redis) < commands.index(head)
    assert "RAY_REDIS_ADDRESS=127.0.0.1:6380" in head and '--redis-password="$(cat ~/.ray/redis_password)"' in head


def test_the_token_is_found_in_rays_order_and_named_not_shown(tmp_path):
    home = tmp_path / "home"
    assert token_source({"HOME": str(home)}) is None
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("secret-token-value")
    assert token_source({"HOME": str(home)}) == str(home / ".ray" / "auth_token")
    assert token_source({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": "/elsewhere"}).startswith("/elsewhere")
    assert token_source({"HOME": str(home), "RAY_AUTH_TOKEN": "secret-token-value"}) == "$RAY_AUTH_TOKEN"


def test_a_client_sends_the_token_it_finds_unless_told_otherwise(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t")
    environ = {"HOME": str(tmp_path)}
    assert enable_client_token(environ) and environ["RAY_AUTH_MODE"] == "token"
    disabled = {"HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}
    assert enable_client_token(disabled) is None and disabled["RAY_AUTH_MODE"] == "disabled"
    none_found = {"HOME": str(tmp_path / "nobody")}
    assert enable_client_token(none_found) is None and "RAY_AUTH_MODE" not in none_found


def test_an_embedded_cluster_told_to_skip_the_token_is_warned_about(caplog):
    unset: dict[str, str] = {}
    warn_if_embedded_unauthenticated(unset)
    assert unset == {} and not caplog.text  # Ray's own default for a local cluster: token mode
    warn_if_embedded_unauthenticated({"RAY_AUTH_MODE": "disabled"})
    assert "accepts jobs from anyone" in caplog.text
