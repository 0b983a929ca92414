"""MinHash signatures and LSH band keys for a whole Arrow batch at once.

datasketch's ``MinHash.update_batch`` hashes one document at a time with a
Python call per shingle (SHA-1). Here the batch is hashed in bulk: words are
split and dictionary-encoded by Arrow, each distinct word is hashed once by
pandas' vectorised SipHash, word n-gram shingles are combined with numpy over
the whole batch, and the permutations plus per-document minimum run as one
numpy pass per chunk. The permutation family (a·h + b mod 2^32, a and b drawn
by datasketch's ``MinHash(num_perm, seed)``) is datasketch's affine32 scheme,
and the band/row split comes from datasketch's ``MinHashLSH`` optimiser, so
the estimates and collision probabilities are datasketch's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_PRIME = np.uint64(0x100000001B3)
#: Shingles per permutation chunk: bounds the chunk's (shingles x num_perm) matrix to a few MB.
CHUNK_SHINGLES = 8192
EMPTY = np.uint32(0xFFFFFFFF)


def fmix64(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (an avalanching bijection); wraps modulo 2^64."""
    with np.errstate(over="ignore"):
        values = values ^ (values >> np.uint64(33))
        values = values * _M1
        values = values ^ (values >> np.uint64(33))
        values = values * _M2
        return values ^ (values >> np.uint64(33))


@dataclass(frozen=True)
class LSHParams:
    num_perm: int
    bands: int
    rows: int
    seed: int

    @classmethod
    def for_threshold(cls, threshold: float, num_perm: int, seed: int, false_positive_weight: float = 0.5) -> LSHParams:
        """Bands and rows minimising weighted false positives + negatives at ``threshold``
        (datasketch's own search, through ``MinHashLSH``)."""
        from datasketch import MinHashLSH

        weights = (false_positive_weight, 1.0 - false_positive_weight)
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=weights)
        return cls(num_perm=num_perm, bands=lsh.b, rows=lsh.r, seed=seed)


@functools.lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's affine32 permutation parameters (a, b); cached per process, as each task reuses them."""
    from datasketch import MinHash

    a, b = MinHash(num_perm=num_perm, seed=seed).permutations
    return np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)


def word_hashes(texts: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash of every lower-cased word, offsets of each document's words)."""
    import pandas as pd

    # Trimmed first: utf8_split_whitespace can read a byte past a trailing whitespace run at the end of
    # the buffer and mis-split the last document (apache/arrow#37757; seen once in CI as a changed signature).
    lowered = pc.utf8_trim_whitespace(pc.utf8_lower(texts))
    # The ASCII kernel splits twice as fast and, on ASCII-only text, identically.
    ascii_only = len(lowered) == 0 or pc.all(pc.string_is_ascii(lowered)).as_py() is not False
    words = pc.ascii_split_whitespace(lowered) if ascii_only else pc.utf8_split_whitespace(lowered)
    if isinstance(words, pa.ChunkedArray):
        words = words.combine_chunks()
    offsets = words.offsets.to_numpy().astype(np.int64) - int(words.offsets[0].as_py())
    flat = words.flatten()
    # Arrow keeps "" for leading/trailing whitespace and empty texts: drop them, shift the offsets.
    nonempty = pc.greater(pc.binary_length(flat), 0)
    kept_before = np.concatenate([[0], np.cumsum(nonempty.to_numpy(zero_copy_only=False), dtype=np.int64)])
    offsets, flat = kept_before[offsets], flat.filter(nonempty)
    if len(flat) == 0:
        return np.zeros(0, np.uint64), offsets
    encoded = pc.dictionary_encode(flat)
    distinct = encoded.dictionary.to_numpy(zero_copy_only=False)
    distinct_hashes = pd.util.hash_array(distinct, categorize=False)
    return distinct_hashes[encoded.indices.to_numpy()], offsets


def shingle_hashes(words: np.ndarray, offsets: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every word ``ngram``-gram and the document each belongs to.

    A document shorter than ``ngram`` words has one shingle of all its words; an
    empty document has none.
    """
    lengths = np.diff(offsets)
    doc_of_word = np.repeat(np.arange(len(lengths)), lengths)
    end_of_word = offsets[1:][doc_of_word]
    positions = np.arange(len(words))
    starts = offsets[:-1][doc_of_word]
    valid = (positions + ngram <= end_of_word) | ((positions == starts) & (lengths[doc_of_word] < ngram))
    padded = np.concatenate([words, np.zeros(ngram, np.uint64)])
    combined = fmix64(words.copy())
    with np.errstate(over="ignore"):
        for k in range(1, ngram):
            term = np.where(positions + k < end_of_word, padded[k : k + len(words)], np.uint64(0))
            combined = combined * _PRIME + term
    keep = np.flatnonzero(valid)
    return (fmix64(combined[keep]) >> np.uint64(32)).astype(np.uint32), doc_of_word[keep]


def signatures(texts: pa.Array | pa.ChunkedArray, ngram: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature (documents x num_perm, uint32) of every text; empty texts stay all-max."""
    words, offsets = word_hashes(texts)
    hashes, doc_of = shingle_hashes(words, offsets, ngram)
    signature = np.full((len(offsets) - 1, len(a)), EMPTY, dtype=np.uint32)
    for start in range(0, len(hashes), CHUNK_SHINGLES):
        chunk, docs = hashes[start : start + CHUNK_SHINGLES], doc_of[start : start + CHUNK_SHINGLES]
        with np.errstate(over="ignore"):
            # (num_perm x shingles): each document's shingles are a contiguous run along the rows.
            permuted = a[:, None] * chunk[None, :] + b[:, None]
        segment_starts = np.flatnonzero(np.diff(docs, prepend=-1))
        minima = np.minimum.reduceat(permuted, segment_starts, axis=1).T
        owners = docs[segment_starts]
        signature[owners] = np.minimum(signature[owners], minima)
    return signature


def band_keys(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents x bands) 64-bit bucket keys; the band index is mixed in, so keys of different bands never meet."""
    keys = np.empty((signature.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            key = np.full(signature.shape[0], np.uint64(band + 1) * _M2, dtype=np.uint64)
            for column in signature[:, band * rows : (band + 1) * rows].T:
                key = fmix64(key ^ column.astype(np.uint64)) * _PRIME
            keys[:, band] = fmix64(key)
    return keys


def estimated_jaccard(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Share of equal signature values, row by row."""
    return (left == right).mean(axis=-1)
