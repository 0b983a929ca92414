"""One namespace cluster (a head and two worker nodes, each its own network namespace) for this folder's tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.netns import namespace_cluster

#: The endpoint's key, in every node's environment as an operator puts it there (the serve stage reads it).
API_KEY = "multinode-test-key"


@pytest.fixture(scope="package")
def cluster():
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the namespace cluster needs root, which CI has")
        pytest.skip("the namespace cluster needs root (ip netns, a bridge, veth pairs)")
    # Logical CPUs: no node holds two vLLM replicas (2 each), so two replicas land on two nodes.
    with namespace_cluster(
        Path(f"/tmp/lns{os.getpid()}"), workers=2, head_cpus=2, worker_cpus=3, extra_env={"LOOM_API_KEYS": API_KEY}
    ) as running:
        yield running
