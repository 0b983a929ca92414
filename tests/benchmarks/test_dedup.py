"""Near-dedup: Loom's MinHash LSH on Ray Data against datasketch MinHash + MinHashLSH in one process.

Same planted corpus, same shingles (lower-cased word 5-grams), same threshold and
number of permutations. Three rounds, each running both pipelines on the same corpus
(alternately first). Reported per round: documents/s, per core, precision, recall and
F1 against the planted duplicates, agreement of the two duplicate sets; and, from one
run each, the peak memory of the Ray run at two corpus sizes.

``test_minhash_dedup_defaults_at_the_threshold``: the recipe's default minhash_dedup
against the old defaults on near-duplicates planted at the threshold (true Jaccard
spread over [0.80, 0.95]) and hard negatives just below 0.5: F1 and documents/s.
"""

from __future__ import annotations

import os
import threading
import time
from functools import partial

import pytest

from tests.benchmarks.conftest import comparison, side_by_side, timed, warmed
from tests.helpers import document_table, union_find_roots
from tests.planted_corpus import planted_corpus

pytestmark = pytest.mark.benchmark
THRESHOLD, NUM_PERM, NGRAM = 0.8, 128, 5


def datasketch_drops(documents: list[tuple[str, str]], bands: tuple[int, int] | None = None) -> set[str]:
    """The textbook single-process pipeline: MinHash per document, LSH insert + query, union-find.
    ``bands`` (bands, rows) fixes the LSH split; unset, datasketch derives it from the threshold."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, params=bands)
    signatures = {}
    for doc_id, text in documents:
        words = text.lower().split()
        shingles = {" ".join(words[i : i + NGRAM]).encode() for i in range(max(1, len(words) - NGRAM + 1))}
        minhash = MinHash(num_perm=NUM_PERM, seed=1)
        minhash.update_batch(shingles)
        signatures[doc_id] = minhash
        lsh.insert(doc_id, minhash)
    pairs = [(doc_id, other) for doc_id, minhash in signatures.items() for other in lsh.query(minhash)]
    roots = union_find_roots((doc_id for doc_id, _ in documents), pairs)
    return {doc_id for doc_id, root in roots.items() if root != doc_id}


def as_dataset(documents: list[tuple[str, str]]):
    """The corpus as the data stage hands it to a step: a materialised Ray Dataset (16 blocks)."""
    import ray.data

    table = document_table([t for _, t in documents], [d for d, _ in documents], source="bench")
    return ray.data.from_arrow(table).repartition(16).materialize()


def loom_drops(ds, step=None) -> set[str]:
    """Documents ``step`` marks as near-duplicates; by default the step with datasketch's own settings
    (bands for equal false-positive and false-negative weights, no verification), like for like."""
    from pipelines.data.dedup import MinHashDedup

    if step is None:
        step = MinHashDedup(
            threshold=THRESHOLD,
            num_perm=NUM_PERM,
            ngram=NGRAM,
            num_partitions=4,
            false_positive_weight=0.5,
            verify=False,
        )
    marked = step.apply(ds)
    dropped = set()
    for batch in marked.select_columns(["doc_id", "reject_reason"]).iter_batches(batch_format="pyarrow"):
        for doc_id, reason in zip(
            batch.column("doc_id").to_pylist(), batch.column("reject_reason").to_pylist(), strict=True
        ):
            if reason is not None:
                dropped.add(doc_id)
    return dropped


class PeakMemory:
    """Peak resident memory of this process and every Ray process on the machine, sampled."""

    def __init__(self, interval_s: float = 0.25):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()

    def _sample(self) -> int:
        import psutil

        total = 0
        for process in psutil.process_iter(["name", "cmdline", "memory_info"]):
            try:
                cmdline = " ".join(process.info["cmdline"] or [])
                if process.pid == os.getpid() or "ray" in cmdline or (process.info["name"] or "").startswith("ray"):
                    total += process.info["memory_info"].rss
            except (TypeError, AttributeError):
                continue
        return total

    def __enter__(self):
        self.baseline = self._sample()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def f1(found: set[str], expected: set[str]) -> tuple[float, float, float]:
    hits = len(found & expected)
    precision = hits / len(found) if found else 1.0
    recall = hits / len(expected) if expected else 1.0
    return precision, recall, 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def test_minhash_dedup_against_datasketch(record_benchmark):
    import ray

    from cluster.config import ClusterConfig
    from cluster.connect import connect

    connect(ClusterConfig(num_cpus=8))
    cores = os.cpu_count() or 1
    memory = {}
    # Warm-up: Ray starts its worker processes and shuffle actors once; every timed run finds them up (started
    # again before each, after datasketch's run).
    warm_up = as_dataset(planted_corpus(bases=200, uniques=1000, seed=1).documents)
    loom_drops(warm_up)
    for documents_wanted in (25_000, 50_000):
        bases = documents_wanted // 10
        corpus = planted_corpus(
            bases=bases, variants_per_base=2, hard_negatives=bases, uniques=documents_wanted - 4 * bases, seed=11
        )
        documents, expected = corpus.documents, corpus.expected_drops()
        # Both pipelines start from the corpus in their own in-memory form: a list of strings for datasketch,
        # a materialised Ray Dataset for Loom (as the data stage's previous step leaves it).
        ds = as_dataset(documents)
        # Memory in its own run: the sampler walks every process four times a second, which costs
        # the timed run a good share of one of the two cores.
        with PeakMemory() as peak:
            loom_drops(ds)
        memory[len(documents)] = round((peak.peak - peak.baseline) / 2**20)
    runs = side_by_side(
        {
            "datasketch": timed(partial(datasketch_drops, documents)),
            "Loom": warmed(partial(loom_drops, ds), partial(loom_drops, warm_up)),
        }
    )
    ray.shutdown()
    quantities = {
        "datasketch docs/s": [len(documents) / seconds for seconds, _ in runs["datasketch"]],
        "Loom docs/s": [len(documents) / seconds for seconds, _ in runs["Loom"]],
        "datasketch F1": [f1(found, expected)[2] for _, found in runs["datasketch"]],
        "Loom F1": [f1(found, expected)[2] for _, found in runs["Loom"]],
        "Loom precision": [f1(found, expected)[0] for _, found in runs["Loom"]],
        "Loom recall": [f1(found, expected)[1] for _, found in runs["Loom"]],
        "agreement F1": [
            f1(ours, theirs)[2] for (_, ours), (_, theirs) in zip(runs["Loom"], runs["datasketch"], strict=True)
        ],
    }
    quantities["Loom docs/s/core"] = [value / cores for value in quantities["Loom docs/s"]]
    quantities["datasketch docs/s/core"] = quantities["datasketch docs/s"]  # one process, one core
    assert min(quantities["Loom F1"]) >= 0.95 and min(quantities["agreement F1"]) >= 0.95
    record_benchmark(
        "dedup",
        stage="data: dedup",
        measure="MinHash + LSH near-dedup vs datasketch MinHash + MinHashLSH, one process",
        inputs={
            "documents": len(documents),
            "planted_duplicates": len(expected),
            "threshold": THRESHOLD,
            "num_perm": NUM_PERM,
            "ngram": NGRAM,
            "ray_cores": cores,
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "documents/s per core", "documents/s per core", quantities, "Loom docs/s/core", "datasketch docs/s/core"
            ),
            comparison(
                f"documents/s ({cores} cores vs 1)",
                f"documents/s, {cores} cores vs 1 process",
                quantities,
                "Loom docs/s",
                "datasketch docs/s",
            ),
            comparison(
                "F1 vs planted duplicates",
                "F1 vs planted duplicates",
                quantities,
                "Loom F1",
                "datasketch F1",
                kind="difference",
            ),
        ],  # fmt: skip
        peak_extra_memory_mib_by_documents_one_run=memory,
    )


def test_signature_kernel_against_datasketch(record_benchmark):
    """The vectorised signature kernel alone, one process, no Ray: where the per-core speed comes from."""
    import numpy as np
    import pyarrow as pa
    from datasketch import MinHash

    from pipelines.data.minhash import permutations, signatures

    texts = [text for _, text in planted_corpus(bases=1000, uniques=7000, seed=5).documents]
    a, b = permutations(NUM_PERM, seed=1)

    def baseline() -> None:
        for text in texts:
            words = text.lower().split()
            minhash = MinHash(num_perm=NUM_PERM, seed=1)
            minhash.update_batch({" ".join(words[i : i + NGRAM]).encode() for i in range(len(words) - NGRAM + 1)})

    def loom():
        for i in range(0, len(texts), 1024):
            sig = signatures(pa.array(texts[i : i + 1024]), NGRAM, a, b)
        return sig

    runs = side_by_side({"datasketch": timed(baseline), "Loom": timed(loom)})
    sig = runs["Loom"][-1][1]
    assert sig.shape == (len(texts) - (len(texts) - 1) // 1024 * 1024, NUM_PERM) and sig.dtype == np.uint32
    quantities = {f"{name} docs/s": [len(texts) / seconds for seconds, _ in values] for name, values in runs.items()}
    record_benchmark(
        "minhash_signatures",
        stage="data: dedup",
        measure="MinHash signature kernel alone, one process, vs datasketch MinHash.update_batch",
        inputs={"documents": len(texts), "num_perm": NUM_PERM, "ngram": NGRAM, "batch": 1024},
        quantities=quantities,
        comparisons=[
            comparison(
                "signature documents/s",
                "signature documents/s, 1 process",
                quantities,
                "Loom docs/s",
                "datasketch docs/s",
            )
        ],  # fmt: skip
    )


def test_minhash_dedup_defaults_at_the_threshold(record_benchmark):
    """What the defaults cost and buy: the recipe's minhash_dedup at its defaults (bands leaning to recall
    at the threshold, every candidate verified) against the old defaults (bands for equal error weights,
    no verification), side by side on one corpus of near-duplicates planted at the threshold."""
    import ray

    from cluster.config import ClusterConfig
    from cluster.connect import connect
    from pipelines.data.config import MinHashDedupStep

    connect(ClusterConfig(num_cpus=8))
    new = MinHashDedupStep(type="minhash_dedup")
    old = MinHashDedupStep(type="minhash_dedup", false_positive_weight=0.5, verify=False)
    documents_wanted, bases = 50_000, 5_000
    positive, negative = (THRESHOLD, 0.95), (0.4, 0.5)
    corpus = planted_corpus(
        bases=bases, variants_per_base=2, hard_negatives=bases, uniques=documents_wanted - 4 * bases, seed=24,
        positive_jaccard=positive, negative_jaccard=negative,
    )  # fmt: skip
    documents, expected, negatives = corpus.documents, corpus.expected_drops(), set(corpus.hard_negatives)
    loom_drops(as_dataset(planted_corpus(bases=200, uniques=1000, seed=1).documents), new.build())  # warm-up
    ds = as_dataset(documents)
    runs = side_by_side(
        {
            "old defaults": timed(lambda: loom_drops(ds, old.build())),
            "new defaults": timed(lambda: loom_drops(ds, new.build())),
        }
    )
    ray.shutdown()
    quantities: dict[str, list[float]] = {}
    for name, values in runs.items():
        quantities[f"{name} docs/s"] = [len(documents) / seconds for seconds, _ in values]
        quantities[f"{name} F1"] = [f1(found, expected)[2] for _, found in values]
        quantities[f"{name} precision"] = [f1(found, expected)[0] for _, found in values]
        quantities[f"{name} recall"] = [f1(found, expected)[1] for _, found in values]
        quantities[f"{name} hard negatives removed"] = [len(found & negatives) for _, found in values]
    assert min(quantities["new defaults F1"]) >= 0.95 and max(quantities["new defaults hard negatives removed"]) == 0
    positives = sorted(corpus.positive_jaccards.values())
    record_benchmark(
        "dedup_defaults",
        stage="data: dedup",
        measure="minhash_dedup at its defaults vs the old defaults, near-duplicates planted at the threshold",
        inputs={
            "documents": len(documents),
            "planted_duplicates": len(expected),
            "hard_negatives": len(negatives),
            "positive_jaccard_range": [round(positives[0], 4), round(positives[-1], 4)],
            "positives_below_0.85": sum(j < 0.85 for j in positives),
            "negative_jaccard_range": [
                round(min(corpus.negative_jaccards.values()), 4),
                round(corpus.max_negative_jaccard, 4),
            ],
            "threshold": THRESHOLD,
            "num_perm": NUM_PERM,
            "ngram": NGRAM,
            "new_defaults": {
                "false_positive_weight": new.false_positive_weight,
                "verify": new.verify,
                "bands": new.build().params.bands,
                "rows": new.build().params.rows,
            },
            "old_defaults": {
                "false_positive_weight": old.false_positive_weight,
                "verify": old.verify,
                "bands": old.build().params.bands,
                "rows": old.build().params.rows,
            },
            "ray_cores": os.cpu_count() or 1,
        },  # fmt: skip
        quantities=quantities,
        comparisons=[
            comparison(
                "F1 at the threshold, new defaults vs old",
                "F1 on near-duplicates planted at the threshold",
                quantities,
                "new defaults F1",
                "old defaults F1",
                kind="difference",
            ),
            comparison(
                "recall at the threshold, new defaults vs old",
                "recall on near-duplicates planted at the threshold",
                quantities,
                "new defaults recall",
                "old defaults recall",
                kind="difference",
            ),
            comparison(
                "documents/s, new defaults / old",
                "documents/s of near-dedup, new defaults / old (the cost of verification)",
                quantities,
                "new defaults docs/s",
                "old defaults docs/s",
            ),
        ],  # fmt: skip
    )
