"""A learned quality filter, in the shape of FineWeb-Edu's and NeMo Curator's classifier steps.

Labels come from the recipe: kept documents of named reference sources are positives; kept
documents of named junk sources and/or the rejects of named earlier steps (the heuristics) are
negatives. Features are fastText-style hashed word n-grams (scikit-learn's ``HashingVectorizer``,
stateless, so the model is only the regression's weights); the classifier is a logistic
regression trained on the driver on at most ``max_train_documents`` per class (the ones with the
smallest hash of doc_id, so a rerun trains on the same documents). A share of the labelled
documents is held out and the step's stats report precision and recall on them.

Scoring runs in a Ray Data actor pool (each actor unpickles the model once). Every kept row gets
a ``quality_score`` (the probability of the positive class; rows already dropped get none), and a
row below the threshold -- fixed, or the quantile that keeps ``keep_fraction`` -- is marked
"quality_classifier: low_score (score 0.120 < 0.500, threshold)". The training rows are scored
like the rest (in-sample for those), so a junk source's documents are dropped by the same rule.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import pickle
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.data.steps import Step, with_columns

SCORE = "quality_score"
#: Words and runs of punctuation, lower-cased: symbol soup and markup become features too.
TOKEN_PATTERN = r"(?u)\w+|[^\w\s]+"


def _unit_hash(doc_id: str) -> float:
    """A stable number in [0, 1) from a doc_id: which labelled rows train and which are held out."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big") / 2**64


def vectorizer(word_ngrams: int, hash_bits: int):
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        n_features=2**hash_bits,
        ngram_range=(1, word_ngrams),
        token_pattern=TOKEN_PATTERN,
        lowercase=True,
        alternate_sign=False,
        norm="l2",
        dtype=np.float32,
    )


class QualityModel:
    """Hashed n-grams -> logistic regression; ``score`` is the probability of the positive (quality) class."""

    def __init__(self, word_ngrams: int, hash_bits: int, max_chars: int, regularization: float = 1.0):
        self.word_ngrams, self.hash_bits, self.max_chars, self.regularization = (
            word_ngrams,
            hash_bits,
            max_chars,
            regularization,
        )
        self.classifier = None

    def _features(self, texts: list[str]):
        return vectorizer(self.word_ngrams, self.hash_bits).transform([t[: self.max_chars] for t in texts])

    def fit(self, texts: list[str], labels: list[int]) -> QualityModel:
        from sklearn.linear_model import LogisticRegression

        if len(set(labels)) != 2:
            raise ValueError(f"quality_classifier: training needs positives and negatives, got labels {set(labels)}")
        self.classifier = LogisticRegression(
            C=self.regularization, class_weight="balanced", max_iter=1000, solver="liblinear"
        ).fit(self._features(texts), np.asarray(labels))
        return self

    def score(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        return self.classifier.predict_proba(self._features(texts))[:, 1]


def precision_recall(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Of the negatives (label 0) as the class to drop: precision and recall of "score < threshold"."""
    dropped, junk = scores < threshold, labels == 0
    hits = int(np.sum(dropped & junk))
    precision = hits / int(np.sum(dropped)) if dropped.any() else 1.0
    recall = hits / int(np.sum(junk)) if junk.any() else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def _labelled(
    table: pa.Table,
    positives: list[str],
    negatives: list[str],
    negative_steps: list[str],
    per_class: int,
    holdout_fraction: float,
) -> pa.Table:
    """The rows of a block that carry a label (1 quality, 0 junk), at most ``per_class`` of each label in
    each part (held out: hash below ``holdout_fraction``; training: the rest): the smallest hashes, so the
    driver's merge of every block's survivors is the global smallest."""
    rows: dict[tuple[int, bool], list[tuple[float, str, str]]] = {}
    prefixes = tuple(f"{step}:" for step in negative_steps)
    for doc_id, source, text, reason in zip(
        *(table.column(c).to_pylist() for c in ("doc_id", "source", "text", "reject_reason")), strict=True
    ):
        if reason is None:
            label = 1 if source in positives else 0 if source in negatives else None
        else:
            label = 0 if prefixes and reason.startswith(prefixes) else None
        if label is not None:
            h = _unit_hash(doc_id)
            rows.setdefault((label, h < holdout_fraction), []).append((h, doc_id, text))
    kept = [(key[0], *row) for key, found in rows.items() for row in heapq.nsmallest(per_class, found)]
    return pa.table(
        {
            "label": pa.array([r[0] for r in kept], pa.int8()),
            "h": pa.array([r[1] for r in kept], pa.float64()),
            "doc_id": pa.array([r[2] for r in kept], pa.string()),
            "text": pa.array([r[3] for r in kept], pa.string()),
        }
    )


class QualityScorer:
    """Ray Data actor: the pickled model loaded once, a score for every row not already dropped."""

    def __init__(self, model: bytes):
        self.model: QualityModel = pickle.loads(model)

    def __call__(self, table: pa.Table) -> pa.Table:
        reasons = table.column("reject_reason").to_pylist()
        texts = table.column("text").to_pylist()
        todo = [i for i, reason in enumerate(reasons) if reason is None]
        scores: list[float | None] = [None] * len(texts)
        for i, score in zip(todo, self.model.score([texts[i] for i in todo]), strict=True):
            scores[i] = float(score)
        column = pa.array(scores, pa.float64())
        if SCORE in table.column_names:
            return table.set_column(table.column_names.index(SCORE), SCORE, column)
        return table.append_column(SCORE, column)


def _mark_below(table: pa.Table, threshold: float, rule: str) -> pa.Table:
    reasons = table.column("reject_reason").to_pylist()
    for i, score in enumerate(table.column(SCORE).to_pylist()):
        if reasons[i] is None and score is not None and score < threshold:
            reasons[i] = f"quality_classifier: low_score (score {score:.3f} < {threshold:.3f}, {rule})"
    return with_columns(table, reject_reason=reasons)


def score_quantile(scored, quantile: float) -> float:
    """The approximate ``quantile`` of the scores across the cluster (NaN when nothing was scored)."""
    from ray.data.aggregate import ApproximateQuantile
    from ray.data.expressions import col

    result = scored.filter(expr=col(SCORE).is_not_null()).aggregate(
        ApproximateQuantile(on=SCORE, quantiles=[quantile], alias_name="q")
    )
    return float(result["q"][0]) if result and result.get("q") else math.nan


class QualityClassifier(Step):
    name = "quality_classifier"

    def __init__(
        self,
        positive_sources: list[str],
        negative_sources: list[str] | None = None,
        negatives_from_steps: list[str] | None = None,
        threshold: float | None = None,
        keep_fraction: float | None = None,
        word_ngrams: int = 2,
        hash_bits: int = 18,
        regularization: float = 1.0,
        max_train_documents: int = 20_000,
        holdout_fraction: float = 0.2,
        max_chars: int = 10_000,
        actors: int = 1,
        batch_size: int = 256,
    ):
        if (threshold is None) == (keep_fraction is None):
            raise ValueError("quality_classifier: set exactly one of threshold, keep_fraction")
        self.positive_sources, self.negative_sources = list(positive_sources), list(negative_sources or [])
        self.negatives_from_steps = list(negatives_from_steps or [])
        self.threshold, self.keep_fraction = threshold, keep_fraction
        self.model = QualityModel(word_ngrams, hash_bits, max_chars, regularization)
        self.max_train_documents, self.holdout_fraction = max_train_documents, holdout_fraction
        self.actors, self.batch_size = actors, batch_size
        self.summary: dict[str, Any] = {}

    def training_rows(self, ds) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(texts, labels, unit hashes) of the labelled rows: per class the ``max_train_documents``
        smallest hashes of the training part and at most as many of the held-out part."""
        blocks = ds.map_batches(
            _labelled,
            fn_kwargs={
                "positives": self.positive_sources,
                "negatives": self.negative_sources,
                "negative_steps": self.negatives_from_steps,
                "per_class": self.max_train_documents,
                "holdout_fraction": self.holdout_fraction,
            },
            batch_size=None,
            batch_format="pyarrow",
        )
        rows: dict[tuple[int, bool], list[tuple[float, str]]] = {}
        for batch in blocks.iter_batches(batch_format="pyarrow", batch_size=None):
            for label, h, text in zip(*(batch.column(c).to_pylist() for c in ("label", "h", "text")), strict=True):
                rows.setdefault((label, h < self.holdout_fraction), []).append((h, text))
        texts, labels, hashes = [], [], []
        for (label, _), found in sorted(rows.items()):
            for h, text in heapq.nsmallest(self.max_train_documents, found):
                texts.append(text)
                labels.append(label)
                hashes.append(h)
        return texts, np.asarray(labels, np.int8), np.asarray(hashes)

    def fit(self, ds) -> None:
        texts, labels, hashes = self.training_rows(ds)
        train = hashes >= self.holdout_fraction
        counts = {"positive": int(np.sum(labels[train] == 1)), "negative": int(np.sum(labels[train] == 0))}
        if not counts["positive"] or not counts["negative"]:
            raise RuntimeError(
                f"quality_classifier: {counts['positive']} positive and {counts['negative']} negative training "
                f"documents (positives: sources {self.positive_sources}; negatives: sources {self.negative_sources}, "
                f"rejects of {self.negatives_from_steps}); both are needed"
            )
        self.model.fit([t for t, keep in zip(texts, train, strict=True) if keep], labels[train].tolist())
        held = ~train
        self.summary = {
            "train_documents": counts,
            "holdout_documents": {
                "positive": int(np.sum(labels[held] == 1)),
                "negative": int(np.sum(labels[held] == 0)),
            },
        }
        self._holdout = ([t for t, keep in zip(texts, held, strict=True) if keep], labels[held])

    def apply(self, ds):
        import ray.data

        ds = ds.materialize()
        self.fit(ds)
        scored = ds.map_batches(
            QualityScorer,
            fn_constructor_kwargs={"model": pickle.dumps(self.model)},
            batch_size=self.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=self.actors),
        ).materialize()
        if self.threshold is not None:
            threshold, rule = self.threshold, "threshold"
        else:
            threshold = score_quantile(scored, 1 - self.keep_fraction) if self.keep_fraction < 1 else 0.0
            rule = f"keep_fraction {self.keep_fraction:g}"
        holdout_texts, holdout_labels = self._holdout
        self.summary.update(threshold=threshold, rule=rule)
        if len(holdout_labels):
            self.summary["holdout"] = precision_recall(self.model.score(holdout_texts), holdout_labels, threshold)
        return scored.map_batches(_mark_below, fn_kwargs={"threshold": threshold, "rule": rule}, batch_format="pyarrow")

    def stats(self) -> dict:
        return self.summary
