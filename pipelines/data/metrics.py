"""The data stage's figures as Ray metrics gauges (``ray_loom_data_*`` in Prometheus), labelled by run.

They are set once, when the stage has counted its rejects, by the driver that ran it; the data
dashboard and the reject-ratio alert read them.
"""

from __future__ import annotations

from typing import Any


def export_gauges(run_name: str, stats: dict[str, Any]) -> None:
    """Set the gauges. Ray's core worker exports each last value for as long as this process lives."""
    from ray.util.metrics import Gauge

    run = {"run": run_name}
    totals = Gauge("loom_data_documents_in", "Documents the data stage read.", ("run",))
    totals.set(stats["documents_in"], tags=run)
    kept = Gauge("loom_data_documents_kept", "Documents the data stage kept.", ("run",))
    kept.set(stats["documents_out"], tags=run)
    rejected = Gauge("loom_data_documents_rejected", "Documents the data stage rejected.", ("run",))
    rejected.set(stats["documents_rejected"], tags=run)
    by_reason = Gauge("loom_data_rejects", "Rejected documents by reason code.", ("run", "reason"))
    for reason, count in stats["drops_by_reason"].items():
        by_reason.set(count, tags={**run, "reason": reason})
    tokens = Gauge("loom_data_tokens", "Tokens by source after tokenization.", ("run", "source"))
    for source, count in stats["tokens_by_source"].items():
        tokens.set(count, tags={**run, "source": source})
    clusters = Gauge("loom_data_dedup_clusters", "Duplicate clusters a dedup step found.", ("run", "step"))
    for step, figures in stats["steps"].items():
        if isinstance(figures, dict) and "duplicate_clusters" in figures:
            clusters.set(figures["duplicate_clusters"], tags={**run, "step": step})
