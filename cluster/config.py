"""The ``cluster`` section: where the Ray cluster is and how jobs are shipped to it."""

from __future__ import annotations

from pydantic import Field

from pipelines.schema import StrictModel

DEFAULT_EXCLUDES = [
    ".venv/",
    ".git/",
    "runs/",
    "bench-results/",
    "**/__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.egg-info/",
]


class ClusterConfig(StrictModel):
    address: str | None = Field(
        default=None,
        description="Ray address to connect to (e.g. 'ray://head:10001' or 'auto'). "
        "Unset: the RAY_ADDRESS environment variable, else an embedded local Ray.",
    )
    num_cpus: int | None = Field(
        default=None,
        ge=1,
        description="Logical CPUs of the embedded local Ray. Unset: max(8, cores), enough for "
        "Serve's ingress replica next to the engine replicas on a small machine.",
    )
    object_store_memory_gib: float | None = Field(
        default=None,
        gt=0,
        description="Object store size of the embedded local Ray in GiB. Unset: Ray's default.",
    )
    runtime_env_excludes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXCLUDES),
        description="Paths left out of the working_dir that `loom submit` uploads "
        "(Ray caps the upload at about 500 MB).",
    )
    train_report_poll_s: float = Field(
        default=0.2,
        gt=0,
        le=10,
        description="How often Ray Train's controller collects workers' reports (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S; "
        "Ray's default 2 s). A worker's report waits until the previous one is collected, so the default "
        "throttles a run that reports more often than every 2 s.",
    )
    idle_worker_keep_s: float = Field(
        default=60,
        gt=0,
        le=3600,
        description="How long the embedded local Ray keeps an idle worker process beyond its soft limit of one per "
        "CPU (Ray's idle_worker_killing_time_threshold_ms; Ray's default 1 s). Ray Data's shuffle actors count "
        "towards that limit, so with the default a chain of short Ray Data operations kills and restarts Python "
        "workers between operations (the 50k-document dedup took 12 s instead of 4 s on 2 cores). "
        "cluster.yaml sets the same on every node.",
    )
    metrics_report_interval_s: float = Field(
        default=2,
        ge=1,
        le=60,
        description="How often the embedded local Ray's processes push their metrics to its Prometheus endpoint "
        "(Ray's metrics_report_interval_ms; Ray's default 10 s). A short-lived worker, such as a training "
        "worker on a small run, can exit between two pushes of Ray's default and its last gauges never reach "
        "Prometheus.",
    )
    pip: list[str] = Field(
        default_factory=list,
        description="Extra pip packages for the job's runtime_env. Cluster nodes should already "
        "have Loom's dependencies (cluster.yaml setup_commands); this is for small additions.",
    )

    def ray_env_vars(self) -> dict[str, str]:
        """Environment every Ray process of a Loom job gets (embedded Ray, `ray.init`, `loom submit`)."""
        return {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": str(self.train_report_poll_s)}
