"""MinHash signatures on Arrow batches, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from datasketch import MinHashLSH

from pipelines.data.components import _both_directions
from pipelines.data.config import MinHashDedupStep
from pipelines.data.dedup import _shard_edges, _verified, _verified_against, shingle_sets
from pipelines.data.minhash import (
    EMPTY,
    LSHParams,
    band_keys,
    estimated_jaccard,
    permutations,
    signatures,
    word_hashes,
)
from tests.helpers import document_table
from tests.planted_corpus import jaccard, planted_corpus


def test_signature_similarity_estimates_true_jaccard():
    corpus = planted_corpus(bases=1, variants_per_base=0, hard_negatives=0, uniques=0, words=400, seed=3)
    base = corpus.documents[0][1].split()
    a, b = permutations(256, seed=1)
    for edits in (2, 20, 60):
        variant = list(base)
        for i in range(0, len(variant), len(variant) // edits):
            variant[i] = "changed"
        texts = [" ".join(base), " ".join(variant)]
        sig = signatures(pa.array(texts), 5, a, b)
        assert abs(estimated_jaccard(sig[0], sig[1]) - jaccard(*texts)) < 0.08


def test_signatures_do_not_depend_on_the_batch_a_document_lands_in():
    texts = [text for _, text in planted_corpus(bases=5, uniques=5, seed=1).documents]
    a, b = permutations(64, seed=1)
    whole = signatures(pa.array(texts), 5, a, b)
    pieces = np.vstack([signatures(pa.array(texts[i : i + 3]), 5, a, b) for i in range(0, len(texts), 3)])
    assert np.array_equal(whole, pieces)


def test_words_are_pythons_str_split_of_the_lower_cased_text():
    spaces = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
    texts = [
        "Plain ASCII words, and\tTABS\nnewlines",
        f"every{spaces}space{spaces[::-1]}python knows",
        "café naïve 中文\u3000全角 emoji🙂 mixed\u00a0nbsp",
        "\u200b zero-width space is not whitespace\u200bhere",
        "",
        None,
        "   ",
    ]
    words, offsets = word_hashes(pa.array(texts, pa.string()))
    expected = [(text or "").lower().split() for text in texts]
    assert np.diff(offsets).tolist() == [len(split) for split in expected]
    # Equal words hash equally wherever they stand, in a string or a large_string batch.
    seen: dict[str, int] = {}
    for word, value in zip([w for split in expected for w in split], words.tolist(), strict=True):
        assert seen.setdefault(word, value) == value
    assert len(set(seen.values())) == len(seen)
    large, _ = word_hashes(
        pa.chunked_array([pa.array(texts[:3], pa.large_string()), pa.array(texts[3:], pa.large_string())])
    )
    assert np.array_equal(large, words)


def test_short_and_empty_documents():
    a, b = permutations(32, seed=1)
    sig = signatures(pa.array(["", "   ", "two words", "Two  WORDS "]), 5, a, b)
    assert (sig[0] == EMPTY).all() and (sig[1] == EMPTY).all()
    assert np.array_equal(sig[2], sig[3]) and not (sig[2] == EMPTY).all()


def test_bands_and_rows_are_datasketchs_optimum():
    params = LSHParams.for_threshold(0.7, 128, seed=1)
    lsh = MinHashLSH(threshold=0.7, num_perm=128)
    assert (params.bands, params.rows) == (lsh.b, lsh.r)
    assert params.bands * params.rows <= 128


def test_identical_bands_share_a_bucket_and_bands_never_collide():
    sig = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [9, 9, 3, 4]], dtype=np.uint32)
    keys = band_keys(sig, bands=2, rows=2)
    assert keys[0, 0] == keys[1, 0] and keys[0, 1] == keys[2, 1]
    assert keys[0, 0] != keys[2, 0] and len({*keys[:, 0], *keys[:, 1]}) == 4


def test_edges_are_made_undirected_without_self_loops():
    table = pa.table({"u": pa.array([1, 2, 3], pa.uint64()), "v": pa.array([2, 2, 1], pa.uint64())})
    out = _both_directions(table)
    assert sorted(zip(out.column("u").to_pylist(), out.column("v").to_pylist(), strict=True)) == [
        (1, 2), (1, 3), (2, 1), (3, 1)
    ]  # fmt: skip


def test_planted_near_duplicates_spread_over_the_range_asked_for():
    corpus = planted_corpus(
        bases=60, hard_negatives=60, uniques=20, seed=4, positive_jaccard=(0.8, 0.95), negative_jaccard=(0.4, 0.5)
    )
    texts = dict(corpus.documents)
    for cluster in corpus.clusters:
        base = texts[cluster[0]]
        for variant in cluster[1:]:  # computed, not assumed
            assert corpus.positive_jaccards[variant] == jaccard(base, texts[variant])
    similarities = sorted(corpus.positive_jaccards.values())
    assert len(similarities) == 120 and 0.8 <= similarities[0] and similarities[-1] <= 0.95
    # Spread, not bunched: every third of the range holds some.
    for low, high in ((0.8, 0.85), (0.85, 0.9), (0.9, 0.95)):
        assert sum(low <= s < high for s in similarities) >= 10, (low, high)
    assert 0.4 <= min(corpus.negative_jaccards.values()) and corpus.max_negative_jaccard < 0.5
    # Existing callers get the corpus they always had.
    again = planted_corpus(bases=40, variants_per_base=2, hard_negatives=40, uniques=80, seed=7)
    assert again.min_positive_jaccard >= 0.9 and again.max_negative_jaccard <= 0.5


def test_default_bands_lean_to_recall_at_the_threshold_and_candidates_are_verified():
    step = MinHashDedupStep(type="minhash_dedup")
    params = step.build().params
    at_threshold = 1 - (1 - step.threshold**params.rows) ** params.bands
    assert at_threshold >= 0.9 and step.verify, (params, at_threshold)


def test_verification_keeps_exactly_the_pairs_at_or_above_the_threshold():
    corpus = planted_corpus(bases=10, hard_negatives=10, uniques=5, seed=2, positive_jaccard=(0.8, 0.95))
    texts = [text for _, text in corpus.documents] + ["", "two words"]
    table = document_table(texts, [f"{i:016x}" for i in range(len(texts))])
    sets = shingle_sets(table, 5).column("shingles").to_pylist()
    pairs = [(i, j) for i in range(len(texts)) for j in range(len(texts)) if i != j]
    candidates = pa.table(
        {
            "u": pa.array([i for i, _ in pairs], pa.uint64()),
            "v": pa.array([j for _, j in pairs], pa.uint64()),
            "shingles_u": pa.array([sets[i] for i, _ in pairs], pa.list_(pa.uint32())),
            "shingles_v": pa.array([sets[j] for _, j in pairs], pa.list_(pa.uint32())),
        }
    )
    kept = _verified(candidates, 0.8)
    found = set(zip(kept.column("u").to_pylist(), kept.column("v").to_pylist(), strict=True))
    expected = {(i, j) for i, j in pairs if texts[i] and texts[j] and jaccard(texts[i], texts[j]) >= 0.8}
    assert found == expected and len(expected) >= 20
    # The broadcast form: the same pairs, each side's set looked up by node.
    table = shingle_sets(document_table(texts, [f"{i:016x}" for i in range(len(texts))]), 5).sort_by("node")
    looked_up = _verified_against(candidates.select(["u", "v"]), table, 0.8)
    assert set(zip(looked_up.column("u").to_pylist(), looked_up.column("v").to_pylist(), strict=True)) == expected


def test_shared_buckets_link_each_member_to_the_smallest():
    shard = pa.table(
        {
            "bucket": pa.array([7, 3, 7, 9, 3, 7, 5], pa.uint64()),
            "node": pa.array([30, 12, 10, 40, 11, 20, 50], pa.uint64()),
        }
    )
    edges = _shard_edges(shard)
    found = sorted(zip(edges.column("u").to_pylist(), edges.column("v").to_pylist(), strict=True))
    assert found == [(12, 11), (20, 10), (30, 10)]  # buckets 9 and 5 hold one document: no edge
