"""The ``cluster`` section: where the Ray cluster is and how jobs are shipped to it."""

from __future__ import annotations

from pydantic import Field, model_validator

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


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class MonitorConfig(StrictModel):
    """``loom monitor``: a Prometheus server scraping the Ray cluster, with Loom's recording and alert rules."""

    host: str = Field(
        default="127.0.0.1",
        description="Address Prometheus listens on. Beyond loopback it must have web_config_file "
        "(Prometheus has no authentication of its own).",
    )
    port: int = Field(default=9090, ge=1, le=65535, description="Prometheus' web and API port.")
    web_config_file: str | None = Field(
        default=None,
        description="Prometheus web configuration (basic-auth users, TLS certificate) passed as --web.config.file.",
    )
    storage: str | None = Field(
        default=None, description="Prometheus' time-series directory. Unset: <storage>/prometheus of the recipe."
    )
    retention: str = Field(default="15d", pattern=r"^\d+[smhdwy]$", description="How long samples are kept.")
    ray_temp_dir: str = Field(
        default="/tmp/ray",
        description="Ray's temporary directory (`ray start --temp-dir`): Ray writes the service-discovery "
        "file of every node's metrics port there.",
    )
    scrape_interval_s: int = Field(default=15, ge=1, le=300, description="Scrape and rule evaluation interval.")
    latency_p99_slo_s: float = Field(
        default=0.5, gt=0, description="Serving SLO: p99 request latency over 5 minutes, per model."
    )
    time_to_first_token_p99_slo_s: float = Field(
        default=0.5, gt=0, description="Serving SLO: p99 time to the first streamed token over 5 minutes, per model."
    )
    error_ratio_max: float = Field(
        default=0.01, gt=0, le=1, description="Largest share of 5xx answers over 5 minutes, per model."
    )
    alert_after_minutes: int = Field(
        default=5, ge=0, description="How long a serving condition must hold before its alert fires."
    )
    replicas_at_max_minutes: int = Field(
        default=15, ge=1, description="Minutes at the autoscaler's max_replicas before the alert fires."
    )
    train_stalled_minutes: int = Field(
        default=10, ge=1, description="Minutes a running training job may go without a new step."
    )
    data_reject_ratio_max: float = Field(
        default=0.5, gt=0, le=1, description="Largest share of documents the data stage may reject."
    )

    @model_validator(mode="after")
    def _authenticated_beyond_loopback(self) -> MonitorConfig:
        if self.host not in LOOPBACK_HOSTS and self.web_config_file is None:
            raise ValueError(
                f"monitor.host '{self.host}' is beyond loopback: set monitor.web_config_file (basic auth and TLS), "
                "or keep the default 127.0.0.1 and reach it over an SSH tunnel"
            )
        return self
