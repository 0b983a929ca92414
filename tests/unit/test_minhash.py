"""MinHash signatures on Arrow batches, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from datasketch import MinHashLSH

from pipelines.data.components import _both_directions
from pipelines.data.minhash import EMPTY, LSHParams, band_keys, estimated_jaccard, permutations, signatures
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
