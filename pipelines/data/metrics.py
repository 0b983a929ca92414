"""The data stage's figures as Ray metrics gauges (``ray_loom_data_*`` in Prometheus), labelled by run.

They are set when the stage has counted its rejects, by the driver that ran it, and held
(``pipelines.gauges``) for as long as that process lives; the data dashboard and the reject-ratio
alert read them.
"""

from __future__ import annotations

from typing import Any


def export_gauges(run_name: str, stats: dict[str, Any]) -> None:
    """Set the gauges and hold their values."""
    from ray.util.metrics import Gauge

    from pipelines.gauges import held_gauges

    held = held_gauges()
    run = {"run": run_name}
    totals = Gauge("loom_data_documents_in", "Documents the data stage read.", ("run",))
    held.set(totals, stats["documents_in"], run)
    kept = Gauge("loom_data_documents_kept", "Documents the data stage kept.", ("run",))
    held.set(kept, stats["documents_out"], run)
    rejected = Gauge("loom_data_documents_rejected", "Documents the data stage rejected.", ("run",))
    held.set(rejected, stats["documents_rejected"], run)
    by_reason = Gauge("loom_data_rejects", "Rejected documents by reason code.", ("run", "reason"))
    for reason, count in stats["drops_by_reason"].items():
        held.set(by_reason, count, {**run, "reason": reason})
    tokens = Gauge("loom_data_tokens", "Tokens by source after tokenization.", ("run", "source"))
    for source, count in stats["tokens_by_source"].items():
        held.set(tokens, count, {**run, "source": source})
    clusters = Gauge("loom_data_dedup_clusters", "Duplicate clusters a dedup step found.", ("run", "step"))
    for step, figures in stats["steps"].items():
        if isinstance(figures, dict) and "duplicate_clusters" in figures:
            held.set(clusters, figures["duplicate_clusters"], {**run, "step": step})
