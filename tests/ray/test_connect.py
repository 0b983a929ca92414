"""connect() in a process that is already connected: the same cluster is fine, another is an error naming both;
and the embedded cluster asks every client for Ray's token."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster.config import ClusterConfig
from cluster.connect import ConnectError, connect
from tests.ray.heads import env_without_ray_settings

pytestmark = pytest.mark.ray


def test_connect_again_names_the_cluster_and_refuses_another(ray_cluster):
    import ray

    current = ray.get_runtime_context().gcs_address
    assert current in connect(ClusterConfig())
    assert current in connect(ClusterConfig(), address=current)
    assert current in connect(ClusterConfig(), address="auto")
    with pytest.raises(ConnectError) as refused:
        connect(ClusterConfig(), address="ray://10.1.2.3:10001")
    assert "10.1.2.3:10001" in str(refused.value) and current in str(refused.value)
    assert ray.get_runtime_context().gcs_address == current  # still connected where it was


def test_the_embedded_cluster_refuses_a_client_without_rays_token(ray_cluster, tmp_path):
    # A HOME without ~/.ray/auth_token and no RAY_* settings: what a stranger on the network would have.
    import ray

    gcs = ray.get_runtime_context().gcs_address
    connect_again = [sys.executable, "-c", f"import ray; ray.init(address={gcs!r}); print('connected')"]
    stranger = subprocess.run(
        connect_again, env=env_without_ray_settings(tmp_path), capture_output=True, text=True, timeout=180
    )
    assert stranger.returncode != 0 and "connected" not in stranger.stdout
    assert "InvalidAuthToken" in stranger.stdout + stranger.stderr
