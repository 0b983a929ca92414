"""One way to reach Ray: connect to a cluster, or start an embedded local one."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator

from cluster.auth import warn_if_embedded_unauthenticated
from cluster.config import ClusterConfig

log = logging.getLogger(__name__)


def embedded_num_cpus(config: ClusterConfig) -> int:
    # Serve's ingress replica, the vLLM engine replica and the Train workers each
    # hold a logical CPU; on a 2-core machine Ray would otherwise deadlock waiting.
    return config.num_cpus or max(8, os.cpu_count() or 1)


#: The embedded Ray's own settings: one node, which no autoscaler or spot market drains, so Ray Train's preemption
#: watcher (an actor per training run that polls for draining nodes) has nothing to watch.
EMBEDDED_ENV_VARS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

#: How often a Ray Data execution re-reads the cluster's resources (Ray's default: 1 s).
DATA_LIMITS_REFRESH_S = 0.1


def refresh_data_limits_sooner() -> None:
    """Let each Ray Data execution see the cluster's CPUs within 0.1 s instead of 1 s.

    Ray Data 2.60 asks its autoscaling coordinator for the resources without waiting, so the
    first answer is empty, and the executor caches it for ``GLOBAL_LIMITS_UPDATE_INTERVAL_S``:
    every execution runs one task at a time for its first second (seen on the dedup's
    signature map: 11 of 16 tasks ran one after another; 1.4 s -> 1.0 s with this). A chain
    of short Ray Data operations pays that second each time. A private attribute, so
    skipped with a warning if a Ray upgrade renames it.
    """
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:
        log.warning("Ray Data's ResourceManager moved; its 1 s start-up limit refresh is left as is")
        return
    if hasattr(ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S"):
        ResourceManager.GLOBAL_LIMITS_UPDATE_INTERVAL_S = DATA_LIMITS_REFRESH_S
    else:
        log.warning("Ray Data's GLOBAL_LIMITS_UPDATE_INTERVAL_S is gone; its start-up limit refresh is left as is")


class ConnectError(RuntimeError):
    pass


def _host_port(address: str) -> str:
    """``ray://h:1``, ``h:1`` and ``http://h:1`` name the same endpoint; compare them by host and port."""
    return address.split("://", 1)[-1].rstrip("/")


def _already_connected(target: str | None) -> str:
    """What this process is connected to; an error naming both when ``target`` is another cluster."""
    import ray

    current = ray.get_runtime_context().gcs_address
    if target and target != "auto" and _host_port(target) != _host_port(current):
        raise ConnectError(
            f"asked for the Ray cluster at {target}, but this process is already connected to the one at "
            f"{current}; a process talks to one cluster: call ray.shutdown() first, or drop the address"
        )
    return f"Ray cluster at {current} (already connected)"


def connect(config: ClusterConfig, address: str | None = None, log_to_driver: bool = True) -> str:
    """Initialise Ray once per process and return a description of where it runs.

    Order: the explicit ``address``, then ``cluster.address``, then ``RAY_ADDRESS``
    (set by ``ray job submit``); with none, an embedded local Ray sized for this machine.
    ``log_to_driver=False`` leaves Ray workers' output in Ray's log files instead of this terminal.
    """
    import ray

    refresh_data_limits_sooner()
    target = address or config.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return _already_connected(target)
    if target:
        # Inside `ray job submit` the job's runtime_env already carries these (loom submit sets them).
        in_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
        ray.init(
            address=target,
            log_to_driver=log_to_driver,
            runtime_env=None if in_job else {"env_vars": config.ray_env_vars()},
        )
        return f"Ray cluster at {target}"
    num_cpus = embedded_num_cpus(config)
    # The embedded cluster's processes inherit this process's environment.
    for name, value in {**config.ray_env_vars(), **EMBEDDED_ENV_VARS}.items():
        os.environ.setdefault(name, value)
    warn_if_embedded_unauthenticated()
    dashboard_port = _free_loopback_port()
    with _state_api_at(f"http://127.0.0.1:{dashboard_port}"):
        _init_embedded(config, num_cpus, dashboard_port, log_to_driver)
    return f"embedded local Ray ({num_cpus} logical CPUs)"


def _free_loopback_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


#: Where Ray's State API clients look for the dashboard before searching the machine for "the" cluster.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


@contextlib.contextmanager
def _state_api_at(url: str) -> Iterator[None]:
    """Point the embedded cluster's processes at its own dashboard, for the State API.

    Asked without an address, Ray's State API looks for "the" cluster on the machine (the address file any
    `ray start` writes, else the one GCS process it finds) and fails with two ("Found multiple active Ray
    instances"). Ray Train's placement-group cleaner asks it whether a training controller is alive, and dies of
    that error: a trial that Tune stops (ASHA) then keeps its workers' placement group, and their CPUs, for the
    cluster's lifetime; next to a `ray start` cluster it would ask that one, and remove a running trial's group.
    The raylet and every worker inherit the variable at ``ray.init``; it is set for that call only, so that this
    process's own clients (a `loom submit --address` it starts) keep their addresses.
    """
    if API_SERVER_ENV in os.environ:  # the caller chose
        yield
        return
    os.environ[API_SERVER_ENV] = url
    try:
        yield
    finally:
        os.environ.pop(API_SERVER_ENV, None)


def _init_embedded(config: ClusterConfig, num_cpus: int, dashboard_port: int, log_to_driver: bool) -> None:
    import ray

    memory = config.object_store_memory_gib
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=int(memory * 2**30) if memory else None,
        # The dashboard serves Ray's State API, which Ray Train's placement-group cleaner asks whether a
        # training controller is still alive: without it a trial that Tune stops (ASHA) keeps its workers'
        # placement group, and its CPUs, for the cluster's lifetime. Loopback only, like every Loom port.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        log_to_driver=log_to_driver,
        _system_config={
            "idle_worker_killing_time_threshold_ms": int(config.idle_worker_keep_s * 1000),
            "metrics_report_interval_ms": int(config.metrics_report_interval_s * 1000),
        },
    )
