"""connect() in a process that is already connected: the same cluster is fine, another is an error naming both."""

from __future__ import annotations

import pytest

from cluster.config import ClusterConfig
from cluster.connect import ConnectError, connect

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
