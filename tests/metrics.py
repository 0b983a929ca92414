"""Reading Ray's Prometheus endpoint the way Prometheus does."""

from __future__ import annotations

from pathlib import Path

#: How often a test may read Ray's metrics endpoint while it waits: each read has the agent render every series
#: the cluster ever exported (seconds of CPU late in a long-lived test cluster; see PrometheusServer).
SCRAPE_POLL_S = 5


def scrape() -> dict[str, list]:
    """This node's Ray metrics endpoint, parsed by prometheus_client: sample name -> samples."""
    import httpx
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def total(samples: dict[str, list], name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    return sum(s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items()))


class PrometheusServer:
    """A real Prometheus, started the way ``loom monitor`` starts it, scraping this test session's Ray."""

    def __init__(self, folder, session_dir: str, port: int):
        import subprocess
        import time

        from cluster.config import MonitorConfig
        from cluster.monitor import DISCOVERY_FILE, prometheus_command, write_files
        from tests.helpers import system_tool

        system_tool("prometheus")
        # Every 15 s, as `loom monitor` scrapes by default: each scrape has Ray's metrics agent render every series
        # it holds, and Ray Data's per-dataset series are never dropped, so late in a long-lived test cluster (several
        # hundred datasets) one answer costs the agent seconds of CPU. The rules as the recipe writes them.
        self.config = MonitorConfig(port=port)
        files = write_files(self.config, folder, discovery=Path(session_dir) / DISCOVERY_FILE)
        self.log = open(folder / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            prometheus_command(self.config, files), stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{port}"
        self.started = time.time()

    def api(self, path: str, **params) -> dict:
        import httpx

        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", body
        return body["data"]

    def ready(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def series_over_session(self, expr: str) -> list[dict]:
        """Every series ``expr`` gave at any point since Prometheus started, as a dashboard's range shows it."""
        import time

        return self.api("query_range", query=expr, start=self.started, end=time.time(), step="2s")["result"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()
