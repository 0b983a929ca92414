"""Reading Ray's Prometheus endpoint the way Prometheus does."""

from __future__ import annotations


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
