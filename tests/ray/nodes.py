"""A second Ray node on this machine, joined to the tests' running cluster and killed at will: capacity that comes and
goes, for the elastic cases (a raylet of its own, as ``ray.cluster_utils.Cluster.add_node`` starts one)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tests.helpers import wait_for


def _alive_node_ids() -> set[str]:
    import ray

    return {node["NodeID"] for node in ray.nodes() if node["Alive"]}


@contextlib.contextmanager
def added_node(num_cpus: int) -> Iterator[object]:
    """A Ray node of ``num_cpus`` logical CPUs in the connected cluster, alive on entry; on exit (or :func:`lose`)
    every process of it is killed, as when a machine goes, and Ray has declared it dead."""
    import ray
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    before = _alive_node_ids()
    params = RayParams(
        gcs_address=ray.get_runtime_context().gcs_address,
        num_cpus=num_cpus,
        num_gpus=0,
        object_store_memory=150 * 2**20,
        min_worker_port=0,
        max_worker_port=0,
        node_manager_port=0,
        include_log_monitor=False,
    )
    params.dashboard_agent_listen_port = None  # a free port of its own, not the head agent's
    node = Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    try:
        wait_for(lambda: len(_alive_node_ids() - before) == 1, 60, "the added Ray node to join")
        yield node
    finally:
        lose(node)


def lose(node) -> None:
    """Kill every process of an :func:`added_node` (no goodbye to the GCS) and wait until Ray declares it dead; a
    node already lost is left as it is."""
    if node.node_id not in _alive_node_ids() and not node.live_processes():
        return
    node.kill_all_processes(check_alive=False, allow_graceful=False, wait=True)
    wait_for(lambda: node.node_id not in _alive_node_ids(), 120, "Ray to declare the added node dead")
