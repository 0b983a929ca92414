"""MinHash signatures and LSH band keys for a whole Arrow batch at once.

datasketch's ``MinHash.update_batch`` hashes one document at a time with a
Python call per shingle (SHA-1). Here Arrow lower-cases the batch and three
compiled loops (numba) walk its UTF-8 buffer: words are split as Python's
``str.split()`` splits them and hashed from their bytes, word n-gram shingles
are combined from the word hashes, and each shingle's permutations update the
document's minima, so no (shingles x permutations) matrix is built. Numba
rather than numpy: the numpy version of the same steps (Arrow split, dictionary
encoding, pandas' hash, then array passes per n-gram level) ran at a fifth of
the speed, most of it in temporaries. The permutation family (a·h + b mod 2^32,
a and b drawn by datasketch's ``MinHash(num_perm, seed)``) is datasketch's
affine32 scheme, and the band/row split comes from datasketch's ``MinHashLSH``
optimiser, so the estimates and collision probabilities are datasketch's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numba
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_PRIME = np.uint64(0x100000001B3)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_LOW32 = np.uint64(0xFFFFFFFF)
EMPTY = np.uint32(0xFFFFFFFF)


def fmix64(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser (an avalanching bijection); wraps modulo 2^64."""
    with np.errstate(over="ignore"):
        values = values ^ (values >> np.uint64(33))
        values = values * _M1
        values = values ^ (values >> np.uint64(33))
        values = values * _M2
        return values ^ (values >> np.uint64(33))


@numba.njit(cache=True, nogil=True)
def _fmix64(value):
    value ^= value >> np.uint64(33)
    value *= _M1
    value ^= value >> np.uint64(33)
    value *= _M2
    return value ^ (value >> np.uint64(33))


@numba.njit(cache=True, nogil=True)
def _space_bytes(data, i, end):
    """Length in bytes of the whitespace character at ``data[i]`` (0 if it is none): the characters
    Python's ``str.isspace`` accepts, read from UTF-8."""
    first = data[i]
    if 32 < first < 0xC2:  # most bytes: printable ASCII, or not the first byte of a space
        return 0
    if first == 32 or 9 <= first <= 13 or 28 <= first <= 31:
        return 1
    if first < 0xC2:
        return 0
    if first == 0xC2 and i + 1 < end:
        second = data[i + 1]
        return 2 if second == 0x85 or second == 0xA0 else 0
    if i + 2 >= end:
        return 0
    second, third = data[i + 1], data[i + 2]
    if first == 0xE1:
        return 3 if second == 0x9A and third == 0x80 else 0
    if first == 0xE2:
        if second == 0x80 and (third <= 0x8A or third == 0xA8 or third == 0xA9 or third == 0xAF):
            return 3
        return 3 if second == 0x81 and third == 0x9F else 0
    if first == 0xE3:
        return 3 if second == 0x80 and third == 0x80 else 0
    return 0


@numba.njit(cache=True, nogil=True)
def _split_words(data, offsets, hashes, word_offsets):
    """Counts the words of each text (``hashes`` empty) or also hashes them (FNV-1a over the word's
    bytes, then fmix64). Returns the number of words."""
    fill = len(hashes) > 0
    words = 0
    for doc in range(len(offsets) - 1):
        word_offsets[doc] = words
        i, end = offsets[doc], offsets[doc + 1]
        while i < end:
            space = _space_bytes(data, i, end)
            if space:
                i += space
                continue
            value = _FNV_OFFSET
            while i < end:
                if _space_bytes(data, i, end):
                    break
                value = (value ^ np.uint64(data[i])) * _PRIME
                i += 1
            if fill:
                hashes[words] = _fmix64(value)
            words += 1
    word_offsets[len(offsets) - 1] = words
    return words


@numba.njit(cache=True, nogil=True)
def _shingle(words, position, end, ngram):
    """32-bit hash of the n-gram starting at ``position`` (shorter at the document's end)."""
    combined = _fmix64(words[position])
    for k in range(1, ngram):
        term = words[position + k] if position + k < end else np.uint64(0)
        combined = combined * _PRIME + term
    return np.uint32(_fmix64(combined) >> np.uint64(32))


@numba.njit(cache=True, nogil=True)
def _shingles(words, offsets, ngram, hashes, doc_of):
    """Every document's shingle hashes in order, and the document each belongs to; returns the count."""
    count = 0
    for doc in range(len(offsets) - 1):
        start, end = offsets[doc], offsets[doc + 1]
        last = max(end - ngram + 1, start + 1) if end > start else start
        for position in range(start, last):
            hashes[count] = _shingle(words, position, end, ngram)
            doc_of[count] = doc
            count += 1
    return count


@numba.njit(cache=True, nogil=True)
def _minhash(words, offsets, ngram, a, b, signature):
    for doc in range(len(offsets) - 1):
        start, end = offsets[doc], offsets[doc + 1]
        last = max(end - ngram + 1, start + 1) if end > start else start
        row = signature[doc]
        for position in range(start, last):
            shingle = np.uint64(_shingle(words, position, end, ngram))
            for p in range(len(a)):
                row[p] = min(row[p], np.uint32((np.uint64(a[p]) * shingle + np.uint64(b[p])) & _LOW32))


def shingle_count(offsets: np.ndarray, ngram: int) -> int:
    """Shingles of documents with these word offsets: one per n-gram, one for a shorter document."""
    lengths = np.diff(offsets)
    return int(np.where(lengths > 0, np.maximum(lengths - ngram + 1, 1), 0).sum())


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
    """(64-bit hash of every lower-cased word, offsets of each document's words); words are what
    Python's ``str.split()`` gives, so a document's hashes do not depend on its batch."""
    lowered = pc.utf8_lower(pc.fill_null(texts, ""))
    if isinstance(lowered, pa.ChunkedArray):
        lowered = lowered.combine_chunks() if lowered.num_chunks else pa.array([], lowered.type)
    if not pa.types.is_large_string(lowered.type):
        lowered = lowered.cast(pa.string())
    _, offsets_buffer, data_buffer = lowered.buffers()
    width = np.int64 if pa.types.is_large_string(lowered.type) else np.int32
    offsets = np.frombuffer(offsets_buffer, width, len(lowered) + 1, lowered.offset * np.dtype(width).itemsize)
    offsets = offsets.astype(np.int64)
    data = np.frombuffer(data_buffer, np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    word_offsets = np.zeros(len(lowered) + 1, np.int64)
    count = _split_words(data, offsets, np.zeros(0, np.uint64), word_offsets)
    hashes = np.empty(count, np.uint64)
    _split_words(data, offsets, hashes, word_offsets)
    return hashes, word_offsets


def shingle_hashes(words: np.ndarray, offsets: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every word ``ngram``-gram and the document each belongs to.

    A document shorter than ``ngram`` words has one shingle of all its words; an
    empty document has none.
    """
    count = shingle_count(offsets, ngram)
    hashes, doc_of = np.empty(count, np.uint32), np.empty(count, np.int64)
    _shingles(words, offsets, ngram, hashes, doc_of)
    return hashes, doc_of


def signatures(texts: pa.Array | pa.ChunkedArray, ngram: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature (documents x num_perm, uint32) of every text; empty texts stay all-max."""
    words, offsets = word_hashes(texts)
    signature = np.full((len(offsets) - 1, len(a)), EMPTY, dtype=np.uint32)
    _minhash(words, offsets, ngram, a, b, signature)
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
