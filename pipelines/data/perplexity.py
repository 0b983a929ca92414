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

    def _threshold(self, scored) -> tuple[float, str, float]:
        """(threshold, rule, median) from the kept documents' scores."""
        from ray.data.aggregate import ApproximateQuantile
        from ray.data.expressions import col

        percentile = self.max_percentile if self.max_percentile is not None else 50.0
        quantiles = [0.5, percentile / 100]
        result = (
            scored.filter(expr=col("perplexity").is_not_null())
            .aggregate(ApproximateQuantile(on="perplexity", quantiles=quantiles, alias_name="q"))
        )  # fmt: skip
        median, at_percentile = result["q"] if result and result.get("q") else (math.nan, math.nan)
        if self.max_perplexity is not None:
            return self.max_perplexity, "absolute", median
        if self.max_relative_to_median is not None:
            return median * self.max_relative_to_median, f"{self.max_relative_to_median}x median {median:.1f}", median
        return at_percentile, f"p{percentile:g}", median

    def apply(self, ds):
        import ray.data

        scored = ds.map_batches(
            PerplexityScorer,
            fn_constructor_kwargs={"model_path": self.model_path, "max_tokens": self.max_tokens},
            batch_size=self.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=self.actors),
        ).materialize()
        threshold, rule, median = self._threshold(scored)
        self.summary = {
            "threshold": threshold,
            "rule": rule,
            "median": median,
            "histogram": perplexity_histogram(scored),
        }
        return scored.map_batches(_mark_above, fn_kwargs={"threshold": threshold, "rule": rule}, batch_format="pyarrow")

    def stats(self) -> dict:
        return self.summary


def perplexity_histogram(scored, bins: int = 30) -> dict[str, list[float]]:
    """Counts of scores in log-spaced bins, accumulated batch by batch (no full column on the driver)."""
    lows, highs = [], []
    for batch in scored.select_columns(["perplexity"]).iter_batches(batch_format="numpy"):
        values = batch["perplexity"].astype(np.float64)
        values = values[np.isfinite(values)]
        if len(values):
            lows.append(values.min())
            highs.append(values.max())
    if not lows:
        return {"edges": [], "counts": []}
    edges = np.geomspace(max(min(lows), 1e-3), max(max(highs), min(lows) * 1.0001), bins + 1)
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
