"""Tokenize documents in an actor pool and pack the ids into fixed-length sequences."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


class Tokenize:
    """Ray Data actor: loads the tokenizer once, appends EOS after every document."""

    def __init__(self, tokenizer_dir: str):
        from pipelines.model.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.eos_id = self.tokenizer.eos_token_id

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = batch.column("text").to_pylist()
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = [np.asarray(doc + [self.eos_id], dtype=np.int32) for doc in encoded]
        return pa.table(
            {
                "doc_id": batch.column("doc_id"),
                "source": batch.column("source"),
                "ids": pa.array(ids, pa.list_(pa.int32())),
                "num_tokens": pa.array([len(doc) for doc in ids], pa.int64()),
            }
        )


def pack(batch: pa.Table, seq_len: int) -> pa.Table:
    """Concatenate the batch's documents (EOS-separated) and cut into ``seq_len`` rows.

    The tail shorter than ``seq_len`` is dropped; the stage reports how many tokens that cost.
    """
    flat = batch.column("ids").combine_chunks().flatten().to_numpy()
    rows = len(flat) // seq_len
    sequences = flat[: rows * seq_len].reshape(rows, seq_len)
    return pa.table({"input_ids": pa.array(list(sequences), pa.list_(pa.int32()))})


def mix_keep_fractions(tokens_by_source: dict[str, int], weights: dict[str, float]) -> dict[str, float]:
    """Share of each source's documents to keep so token shares match ``weights``.

    Mixing only downsamples: the source with the fewest tokens for its weight is kept
    whole and the others are cut to match it (no document is repeated).
    """
    total_weight = sum(weights.values())
    shares = {source: weight / total_weight for source, weight in weights.items()}
    missing = [source for source in shares if tokens_by_source.get(source, 0) == 0 and shares[source] > 0]
    if missing:
        raise ValueError(f"data.mix: no tokens left from source(s) {missing} after curation; cannot mix")
    budget = min(tokens_by_source[source] / share for source, share in shares.items() if share > 0)
    return {source: min(1.0, budget * share / tokens_by_source[source]) if share > 0 else 0.0 for source, share in shares.items()}


def sample_by_source(batch: pa.Table, keep: dict[str, float], seed: int) -> pa.Table:
    """Keep each document with its source's probability, decided by a hash of (seed, doc_id):
    the same documents on every run and any number of workers."""
    import hashlib

    sources = batch.column("source").to_pylist()
    mask = []
    for doc_id, source in zip(batch.column("doc_id").to_pylist(), sources, strict=True):
        draw = int.from_bytes(hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest(), "big") / 2**64
        mask.append(draw < keep.get(source, 1.0))
    return batch.filter(pa.array(mask, pa.bool_()))
