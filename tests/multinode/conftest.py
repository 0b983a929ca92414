"""One namespace cluster (a head and two worker nodes, each its own network namespace) for this folder's tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.multinode.scenarios import StageRun, submit_tiny_data, submit_tiny_training, three_nodes


@pytest.fixture(scope="package")
def cluster():
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the namespace cluster needs root, which CI has")
        pytest.skip("the namespace cluster needs root (ip netns, a bridge, veth pairs)")
    # The head's GCS in Redis (the head-restart test) where redis-server is installed; CI installs it.
    redis = shutil.which("redis-server") is not None or bool(os.environ.get("CI"))
    with three_nodes(Path(f"/tmp/lns{os.getpid()}"), redis=redis, fast_detection=True) as running:
        yield running


@pytest.fixture(scope="package")
def tiny_data(cluster, tmp_path_factory) -> StageRun:
    """The tiny recipe's data stage, submitted once: the chain and the training cases start from copies of it, and
    the data node-loss case compares its disturbed run with it."""
    return submit_tiny_data(cluster, tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="package")
def trained(cluster, tiny_data, tmp_path_factory) -> StageRun:
    """That data stage trained once, undisturbed, three workers on three nodes: the chain serves its model, and the
    training node-loss cases compare their losses with its."""
    return submit_tiny_training(cluster, tiny_data, tmp_path_factory.mktemp("trained"))
