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
