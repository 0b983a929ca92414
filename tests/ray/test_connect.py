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


def test_the_embedded_clusters_processes_ask_its_own_dashboard_for_ray_state(ray_cluster):
    """With another Ray on the machine, Ray's State API would otherwise search for "the" cluster (and Ray Train's
    placement-group cleaner would die of it); this process's own environment stays as it was."""
    import os

    import ray
    from ray.util.state import get_actor

    @ray.remote(num_cpus=0)
    class Asker:
        def where(self):
            return os.environ.get("RAY_API_SERVER_ADDRESS")

        def state_of(self, actor_id):
            return get_actor(actor_id).state

    asker = Asker.remote()
    try:
        where = ray.get(asker.where.remote())
        dashboard = ray._private.worker.global_worker.node.address_info["webui_url"]  # host:port, no scheme
        assert where == f"http://{dashboard}" and dashboard.startswith("127.0.0.1:")
        assert ray.get(asker.state_of.remote(asker._actor_id.hex())) == "ALIVE"
        assert "RAY_API_SERVER_ADDRESS" not in os.environ
    finally:
        ray.kill(asker)


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
