"""Perplexity filter: score every document with a reference causal LM, drop the surprising ones.

Scoring runs in a Ray Data actor pool, so each actor loads the model once. The
threshold is absolute (``max_perplexity``), a multiple of the corpus median
(``max_relative_to_median``, e.g. 1.2) or a
percentile (``max_percentile``), the last two computed across the cluster with
Ray Data's approximate quantiles. Scores stay in the output (column
``perplexity``) so they can be inspected, and the histogram goes in the report.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from pipelines.data.steps import Step, with_columns


class PerplexityScorer:
    """Ray Data actor: a Hugging Face causal LM loaded once, perplexity of each kept row's first tokens."""

    def __init__(self, model_path: str, max_tokens: int, device: str = "cpu"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
        self.max_tokens, self.device = max_tokens, device

    def perplexity(self, text: str) -> float | None:
        ids = self.tokenizer(text, add_special_tokens=False, truncation=True, max_length=self.max_tokens)["input_ids"]
        if len(ids) < 2:
            return None  # nothing to predict
        tokens = self.torch.tensor([ids], device=self.device)
        with self.torch.no_grad():
            loss = self.model(input_ids=tokens, labels=tokens).loss
        return float(math.exp(min(float(loss), 50.0)))

    def __call__(self, table: pa.Table) -> pa.Table:
        reasons = table.column("reject_reason").to_pylist()
        texts = table.column("text").to_pylist()
        scores = [self.perplexity(t) if r is None else None for t, r in zip(texts, reasons, strict=True)]
        column = pa.array(scores, pa.float64())
        if "perplexity" in table.column_names:
            return table.set_column(table.column_names.index("perplexity"), "perplexity", column)
        return table.append_column("perplexity", column)


def _mark_above(table: pa.Table, threshold: float, rule: str) -> pa.Table:
    reasons = table.column("reject_reason").to_pylist()
    for i, score in enumerate(table.column("perplexity").to_pylist()):
        if reasons[i] is None and score is not None and score > threshold:
            reasons[i] = f"perplexity: too_high ({score:.1f} > {threshold:.1f}, {rule})"
    return with_columns(table, reject_reason=reasons)


class PerplexityFilter(Step):
    name = "perplexity"

    def __init__(
        self,
        model_path: str,
        max_perplexity: float | None = None,
        max_relative_to_median: float | None = None,
        max_percentile: float | None = None,
        max_tokens: int = 512,
        actors: int = 1,
        batch_size: int = 16,
    ):
        self.model_path, self.max_tokens, self.actors, self.batch_size = model_path, max_tokens, actors, batch_size
        self.max_perplexity = max_perplexity
        self.max_relative_to_median = max_relative_to_median
        self.max_percentile = max_percentile
        self.summary: dict = {}

    def _threshold(self, scores: ScoreSummary) -> tuple[float, str]:
        """(threshold, rule) from the kept documents' score summary."""
        if self.max_perplexity is not None:
            return self.max_perplexity, "absolute"
        if self.max_relative_to_median is not None:
            return (
                scores.median * self.max_relative_to_median,
                f"{self.max_relative_to_median}x median {scores.median:.1f}",
            )
        return scores.at_percentile, f"p{self._percentile:g}"

    @property
    def _percentile(self) -> float:
        return self.max_percentile if self.max_percentile is not None else 50.0

    def apply(self, ds):
        import ray.data

        scored = ds.map_batches(
            PerplexityScorer,
            fn_constructor_kwargs={"model_path": self.model_path, "max_tokens": self.max_tokens},
            batch_size=self.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=self.actors),
        ).materialize()
        scores = summarize_scores(scored, self._percentile)
        threshold, rule = self._threshold(scores)
        self.summary = {
            "threshold": threshold,
            "rule": rule,
            "median": scores.median,
            "histogram": perplexity_histogram(scored, scores.low, scores.high),
        }
        return scored.map_batches(_mark_above, fn_kwargs={"threshold": threshold, "rule": rule}, batch_format="pyarrow")

    def stats(self) -> dict:
        return self.summary


class ScoreSummary(NamedTuple):
    median: float
    at_percentile: float
    low: float
    high: float


def summarize_scores(scored, percentile: float) -> ScoreSummary:
    """Median, the given percentile, lowest and highest of the scores, in one pass (NaN when none was scored)."""
    from ray.data.aggregate import ApproximateQuantile, Max, Min
    from ray.data.expressions import col

    result = scored.filter(expr=col("perplexity").is_not_null()).aggregate(
        ApproximateQuantile(on="perplexity", quantiles=[0.5, percentile / 100], alias_name="q"),
        Min(on="perplexity", alias_name="low"),
        Max(on="perplexity", alias_name="high"),
    )
    if not result or not result.get("q"):
        return ScoreSummary(math.nan, math.nan, math.nan, math.nan)
    (median, at_percentile), low, high = result["q"], result["low"], result["high"]
    return ScoreSummary(median, at_percentile, low, high)


def perplexity_histogram(scored, low: float, high: float, bins: int = 30) -> dict[str, list[float]]:
    """Counts of scores in ``bins`` log-spaced bins over [low, high], accumulated batch by batch (no full
    column on the driver). Scores are finite: the scorer caps the loss."""
    if not math.isfinite(low) or not math.isfinite(high):
        return {"edges": [], "counts": []}
    edges = np.geomspace(max(low, 1e-3), max(high, low * 1.0001), bins + 1)
    counts = np.zeros(bins, dtype=np.int64)
    for batch in scored.select_columns(["perplexity"]).iter_batches(batch_format="numpy"):
        values = batch["perplexity"].astype(np.float64)
        counts += np.histogram(values[np.isfinite(values)], bins=edges)[0]
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def plot_histogram(histogram: dict, threshold: float, path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges, counts = histogram["edges"], histogram["counts"]
    ax.stairs(counts, edges, fill=True, color="#55a868")
    if math.isfinite(threshold):
        ax.axvline(threshold, color="#c44e52", linestyle="--", label=f"threshold {threshold:.1f}")
        ax.legend()
    ax.set(xscale="log", xlabel="perplexity under the reference model", ylabel="documents", title=title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
