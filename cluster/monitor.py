"""``loom monitor``: a Prometheus server on loopback that scrapes the Ray cluster, with Loom's rules.

Prometheus finds every node's metrics port through the service-discovery file Ray keeps in its
temporary directory (``prom_metrics_service_discovery.json``, rewritten as nodes come and go).
The rules are built from the recipe's ``monitor`` section, so the SLOs and bounds live in one
place; ``promtool check rules`` and ``promtool test rules`` check them (tests/unit/test_monitor.py).

Every Ray metric carries the labels of the process that recorded it (``WorkerId``, ``Component``,
...), so each rule aggregates to the labels it means (model, run) before comparing or joining.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.config import MonitorConfig

#: Ray keeps this name in its temporary directory, a link to the current session's file.
DISCOVERY_FILE = "prom_metrics_service_discovery.json"
DASHBOARDS_DIR = Path(__file__).with_name("dashboards")


class MonitorError(RuntimeError):
    pass


def _p99(bucket: str) -> str:
    return f"histogram_quantile(0.99, sum by (le, model) (rate({bucket}[5m])))"


def recording_rules() -> list[dict[str, str]]:
    requests = "ray_loom_serve_requests_total"
    return [
        {
            "record": "model:loom_serve_request_latency_s:p99_5m",
            "expr": _p99('ray_loom_serve_request_latency_s_bucket{route!="models"}'),
        },
        {
            "record": "model:loom_serve_time_to_first_token_s:p99_5m",
            "expr": _p99("ray_loom_serve_time_to_first_token_s_bucket"),
        },
        {
            # 0 rather than nothing when no 5xx was ever counted, so the ratio is plotted for every model.
            "record": "model:loom_serve_error_ratio:rate5m",
            "expr": f'(sum by (model) (rate({requests}{{status=~"5.."}}[5m])) or sum by (model) (rate({requests}[5m])) * 0)'
            f" / sum by (model) (rate({requests}[5m]))",
        },
        {
            "record": "model:loom_serve_target_replicas:max",
            "expr": 'max by (model) (label_replace(ray_serve_autoscaling_target_replicas, "model", "$1", "deployment", ".*:(.+)"))',
        },
        {
            "record": "run:loom_data_reject_ratio:last",
            "expr": "max by (run) (ray_loom_data_documents_rejected) / max by (run) (ray_loom_data_documents_in)",
        },
    ]


def _alert(name: str, expr: str, minutes: int, severity: str, summary: str) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": f"{minutes}m",
        "labels": {"severity": severity, "team": "loom"},
        "annotations": {"summary": summary},
    }


def alert_rules(config: MonitorConfig) -> list[dict[str, Any]]:
    stalled = config.train_stalled_minutes
    held = config.alert_after_minutes
    return [
        _alert(
            "LoomServeLatencyP99OverSLO",
            f"model:loom_serve_request_latency_s:p99_5m > {config.latency_p99_slo_s}",
            held, "page",
            f"p99 request latency of {{{{ $labels.model }}}} is over the {config.latency_p99_slo_s} s SLO",
        ),
        _alert(
            "LoomServeTimeToFirstTokenP99OverSLO",
            f"model:loom_serve_time_to_first_token_s:p99_5m > {config.time_to_first_token_p99_slo_s}",
            held, "page",
            f"p99 time to first token of {{{{ $labels.model }}}} is over the {config.time_to_first_token_p99_slo_s} s SLO",
        ),
        _alert(
            "LoomServeErrorRatioHigh",
            f"model:loom_serve_error_ratio:rate5m > {config.error_ratio_max}",
            held, "page",
            f"more than {config.error_ratio_max:.0%} of {{{{ $labels.model }}}}'s answers are 5xx",
        ),
        _alert(
            "LoomServeReplicasPinnedAtMax",
            "model:loom_serve_target_replicas:max >= on (model) max by (model) (ray_loom_serve_max_replicas)",
            config.replicas_at_max_minutes, "warning",
            "the autoscaler wants max_replicas of {{ $labels.model }}: raise max_replicas or add nodes",
        ),
        _alert(
            "LoomTrainStalled",
            # Present now (a finished run's series go stale and drop out), present N minutes ago, and unchanged.
            f"max by (run) (changes(ray_loom_train_step[{stalled}m])) == 0"
            " and on (run) max by (run) (ray_loom_train_step)"
            f" and on (run) max by (run) (ray_loom_train_step offset {stalled}m)",
            0, "page",
            f"training run {{{{ $labels.run }}}} has made no step for {stalled} minutes",
        ),
        _alert(
            "LoomTrainLossNotFinite",
            "count by (run) (ray_loom_train_loss != ray_loom_train_loss or abs(ray_loom_train_loss) == Inf) > 0",
            0, "page",
            "training run {{ $labels.run }} reported a NaN or infinite loss",
        ),
        _alert(
            "LoomDataRejectRatioHigh",
            f"run:loom_data_reject_ratio:last > {config.data_reject_ratio_max}",
            0, "warning",
            f"the data stage of {{{{ $labels.run }}}} rejected more than {config.data_reject_ratio_max:.0%} of its "
            "documents; the reasons are in <run>/data/rejects",
        ),
    ]  # fmt: skip


def rule_groups(config: MonitorConfig) -> dict[str, Any]:
    interval = f"{config.scrape_interval_s}s"
    return {
        "groups": [
            {"name": "loom-recording", "interval": interval, "rules": recording_rules()},
            {"name": "loom-alerts", "interval": interval, "rules": alert_rules(config)},
        ]
    }


def prometheus_config(config: MonitorConfig, rules: Path, discovery: Path) -> dict[str, Any]:
    interval = f"{config.scrape_interval_s}s"
    return {
        # A scrape may take the whole interval: Ray's agent answers with thousands of series, slowly under load.
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(rules)],
        "scrape_configs": [
            {
                "job_name": "ray",
                # Prometheus watches the file; the refresh covers a session link replaced under it.
                "file_sd_configs": [{"files": [str(discovery)], "refresh_interval": "30s"}],
            }
        ],
    }


@dataclass(frozen=True)
class PrometheusFiles:
    config: Path
    rules: Path
    data: Path


def write_files(config: MonitorConfig, folder: Path, discovery: Path | None = None) -> PrometheusFiles:
    """``prometheus.yml`` and ``loom-rules.yml`` in ``folder`` (samples under ``folder/data``)."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    files = PrometheusFiles(folder / "prometheus.yml", folder / "loom-rules.yml", folder / "data")
    files.rules.write_text(yaml.safe_dump(rule_groups(config), sort_keys=False, width=200))
    discovery = discovery or Path(config.ray_temp_dir) / DISCOVERY_FILE
    files.config.write_text(yaml.safe_dump(prometheus_config(config, files.rules, discovery), sort_keys=False))
    return files


def program(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise MonitorError(f"{name} is not installed: `make system-packages` (Debian's prometheus package) installs it")
    return found


def prometheus_command(config: MonitorConfig, files: PrometheusFiles) -> list[str]:
    command = [
        program("prometheus"),
        f"--config.file={files.config}",
        f"--storage.tsdb.path={files.data}",
        f"--storage.tsdb.retention.time={config.retention}",
        f"--web.listen-address={config.host}:{config.port}",
        "--log.level=warn",
    ]
    if config.web_config_file:
        command.append(f"--web.config.file={config.web_config_file}")
    return command


def dashboards() -> dict[str, dict[str, Any]]:
    """Loom's Grafana dashboards, by file stem."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(DASHBOARDS_DIR.glob("*.json"))}


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of a dashboard."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard.get("panels", [])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def storage_folder(config: MonitorConfig, storage: str) -> Path:
    return Path(config.storage or Path(storage) / "prometheus").resolve()


def check_rules(files: PrometheusFiles) -> str:
    """``promtool check config`` (which checks the rule files it names), or a MonitorError with its output."""
    import subprocess

    result = subprocess.run([program("promtool"), "check", "config", str(files.config)], capture_output=True, text=True)
    if result.returncode != 0:
        raise MonitorError(f"promtool refused {files.config}:\n{result.stdout}{result.stderr}")
    return result.stdout


def run_prometheus(config: MonitorConfig, files: PrometheusFiles) -> int:
    """Prometheus in the foreground until it exits or this process is interrupted (then stopped cleanly)."""
    import signal
    import subprocess

    process = subprocess.Popen(prometheus_command(config, files))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: process.terminate())
    return process.wait()
