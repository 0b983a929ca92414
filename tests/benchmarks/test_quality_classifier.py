"""The quality_classifier step on planted junk, side by side with the Gopher heuristics.

Corpus (tests/quality_corpus.py): a ``reference`` source of standard-library docstring prose
(positives), a ``junk`` source (negatives: symbol soup, web boilerplate, keyword spam, log lines,
word salad in equal shares) and a ``web`` source to filter: prose disjoint from the reference's,
with 20% planted junk of the same five kinds (generated afresh, so no web document was trained on).

Contenders, three rounds side by side: the step (hashed word 1-2-grams + logistic regression,
threshold 0.5, one scoring actor) run end to end on a materialised Ray Dataset of all three sources
(training on the driver, scoring every row in the actor pool, marking), and the heuristics
(gopher_quality then repetition at their defaults, in one process). Reported: precision, recall and
F1 of each on the web source's planted junk, the classifier's recall per junk kind, and the cost
per document (wall seconds of the whole run over every document it scored).
"""

from __future__ import annotations

import os
from functools import partial

import pytest

from tests.benchmarks.conftest import comparison, side_by_side, timed
from tests.helpers import document_table
from tests.quality_corpus import JUNK_KINDS, quality_corpus

pytestmark = pytest.mark.benchmark
REFERENCE, JUNK, WEB, JUNK_SHARE = 1000, 1000, 4000, 0.2


def as_dataset(corpus):
    import pyarrow as pa
    import ray.data

    tables = [
        document_table([t for _, t in docs], [d for d, _ in docs], source=source)
        for source, docs in corpus.sources.items()
    ]
    return ray.data.from_arrow(pa.concat_tables(tables)).repartition(8).materialize()


def classifier_drops(ds) -> set[str]:
    from pipelines.data.config import QualityClassifierStep

    step = QualityClassifierStep(
        type="quality_classifier", positive_sources=["reference"], negative_sources=["junk"], threshold=0.5
    ).build()
    dropped = set()
    for batch in step.apply(ds).select_columns(["doc_id", "reject_reason"]).iter_batches(batch_format="pyarrow"):
        for doc_id, reason in zip(
            batch.column("doc_id").to_pylist(), batch.column("reject_reason").to_pylist(), strict=True
        ):
            if reason is not None:
                dropped.add(doc_id)
    return dropped


def heuristic_drops(documents: list[tuple[str, str]]) -> set[str]:
    from pipelines.data.config import GopherQualityStep, RepetitionStep

    filters = [GopherQualityStep(type="gopher_quality").build(), RepetitionStep(type="repetition").build()]
    return {doc_id for doc_id, text in documents if any(f.keep({"text": text}) is not True for f in filters)}


def scores(found: set[str], expected: set[str]) -> tuple[float, float, float]:
    hits = len(found & expected)
    precision = hits / len(found) if found else 1.0
    recall = hits / len(expected) if expected else 1.0
    return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def test_quality_classifier_on_planted_junk(record_benchmark):
    import ray

    from cluster.config import ClusterConfig
    from cluster.connect import connect

    connect(ClusterConfig(num_cpus=4))
    corpus = quality_corpus(reference=REFERENCE, junk=JUNK, web=WEB, junk_share=JUNK_SHARE, seed=24)
    web = set(doc_id for doc_id, _ in corpus.sources["web"])
    expected = corpus.planted_junk
    all_documents = [doc for docs in corpus.sources.values() for doc in docs]
    ds = as_dataset(corpus)
    classifier_drops(ds)  # warm-up: Ray's workers and the scikit-learn imports, once
    runs = side_by_side(
        {
            "classifier": timed(partial(classifier_drops, ds)),
            "heuristics": timed(partial(heuristic_drops, corpus.sources["web"])),
        }
    )
    ray.shutdown()
    quantities = {}
    for name, documents in (("classifier", len(all_documents)), ("heuristics", WEB)):
        measured = [scores(found & web, expected) for _, found in runs[name]]
        quantities[f"{name} precision"] = [m[0] for m in measured]
        quantities[f"{name} recall"] = [m[1] for m in measured]
        quantities[f"{name} F1"] = [m[2] for m in measured]
        quantities[f"{name} ms per document"] = [1000 * seconds / documents for seconds, _ in runs[name]]
    for kind in JUNK_KINDS:
        planted = {d for d in expected if corpus.junk_kinds[d] == kind}
        quantities[f"classifier recall, {kind}"] = [
            len(found & planted) / len(planted) for _, found in runs["classifier"]
        ]
        quantities[f"heuristics recall, {kind}"] = [
            len(found & planted) / len(planted) for _, found in runs["heuristics"]
        ]
    record_benchmark(
        "quality_classifier",
        stage="data: quality_classifier",
        measure="learned quality filter (hashed word n-grams + logistic regression) vs the Gopher heuristics, "
        "on planted junk in held-out web documents",
        inputs={
            "reference_documents": REFERENCE,
            "junk_source_documents": JUNK,
            "web_documents": WEB,
            "planted_junk": len(expected),
            "junk_kinds": list(JUNK_KINDS),
            "step": {"word_ngrams": 2, "hash_bits": 18, "threshold": 0.5, "actors": 1},
            "heuristics": ["gopher_quality", "repetition"],
            "ray_cores": os.cpu_count(),
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "F1 on planted junk, vs heuristics",
                "F1 on planted junk",
                quantities,
                "classifier F1",
                "heuristics F1",
                kind="difference",
            ),
            comparison("precision on planted junk", "precision", quantities, "classifier precision"),
            comparison("recall on planted junk", "recall", quantities, "classifier recall"),
            comparison(
                "ms per document (train + score + mark)",
                "wall ms per document, all sources",
                quantities,
                "classifier ms per document",
                better="lower",
            ),
        ],  # fmt: skip
    )
