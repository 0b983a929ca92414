"""The eval stage's scores as Ray metrics gauges (``ray_loom_eval_*`` in Prometheus), labelled by run, model, task
and metric, so a dashboard can follow a model's scores across runs and set the variants beside the base.

Set by the driver that ran the stage once every model is scored, and held (``pipelines.gauges``) for as long as
that process lives, as the data stage's figures are.
"""

from __future__ import annotations

from pipelines.artifacts import EvalSummary


def export_gauges(run_name: str, summary: EvalSummary) -> None:
    """Every metric of every scored model (and the harness's standard error where it gives one); the task's
    headline metric also as ``loom_eval_headline``, which the dashboard plots."""
    import ray
    from ray.util.metrics import Gauge

    from pipelines.gauges import held_gauges

    if not ray.is_initialized():  # scored without a cluster (a unit test): nothing to export to
        return
    held = held_gauges()
    labels = ("run", "model", "task", "metric")
    score = Gauge("loom_eval_score", "An eval task's metric for a model (lm-evaluation-harness).", labels)
    stderr = Gauge("loom_eval_stderr", "The harness's standard error of an eval task's metric.", labels)
    headline = Gauge(
        "loom_eval_headline",
        "An eval task's headline metric for a model (the one the report leads with); better: higher or lower.",
        (*labels, "better"),
    )
    for model, scores in summary.models.items():
        for task, metrics in scores.tasks.items():
            info = summary.tasks[task]
            for metric, measured in metrics.items():
                tags = {"run": run_name, "model": model, "task": task, "metric": metric}
                held.set(score, measured.value, tags)
                if measured.stderr is not None:
                    held.set(stderr, measured.stderr, tags)
                if metric == info.headline:
                    held.set(headline, measured.value, {**tags, "better": info.better})
