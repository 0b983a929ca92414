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


def mix_token_targets(tokens_by_source: dict[str, int], weights: dict[str, float]) -> dict[str, int]:
    """Tokens to keep from each source so token shares match ``weights``.

    Mixing only downsamples: the source with the fewest tokens for its weight is kept
    whole and the others are cut to match it (no document is repeated).
    """
    total_weight = sum(weights.values())
    shares = {source: weight / total_weight for source, weight in weights.items()}
    missing = [source for source in shares if tokens_by_source.get(source, 0) == 0 and shares[source] > 0]
    if missing:
        raise ValueError(f"data.mix: no tokens left from source(s) {missing} after curation; cannot mix")
    budget = min(tokens_by_source[source] / share for source, share in shares.items() if share > 0)
    return {source: min(tokens_by_source[source], round(budget * share)) for source, share in shares.items()}


def _rank(seed: int, doc_ids: list[str]) -> np.ndarray:
    """A deterministic random order of documents: a hash of (seed, doc_id)."""
    import hashlib

    return np.array(
        [int.from_bytes(hashlib.blake2b(f"{seed}:{d}".encode(), digest_size=8).digest(), "big") for d in doc_ids],
        dtype=np.uint64,
    )


def with_rank(batch: pa.Table, seed: int) -> pa.Table:
    return pa.table(
        {
            "source": batch.column("source"),
            "rank": pa.array(_rank(seed, batch.column("doc_id").to_pylist()), pa.uint64()),
            "num_tokens": batch.column("num_tokens"),
        }
    )


def mix_cutoffs(tokenized, targets: dict[str, int], seed: int) -> dict[str, int | None]:
    """Per source, the largest rank to keep so its kept tokens come closest to its target.

    Documents are taken in a random (hashed) order until the source's token target is
    reached: exact to one document, where sampling documents with a probability misses
    by whole large documents. The ranks are sorted across the cluster and streamed to
    the driver a batch at a time (three small columns), so memory stays bounded.
    ``targets`` names only the sources to cut.
    """
    taken = dict.fromkeys(targets, 0)
    cutoffs: dict[str, int | None] = dict.fromkeys(targets)
    open_sources = set(targets)
    ranked = tokenized.map_batches(with_rank, fn_kwargs={"seed": seed}, batch_format="pyarrow").sort("rank")
    for batch in ranked.iter_batches(batch_format="pyarrow"):
        if not open_sources:
            break
        sources = np.asarray(batch.column("source").to_pylist(), dtype=object)
        ranks, tokens = batch.column("rank").to_numpy(), batch.column("num_tokens").to_numpy()
        for source in list(open_sources):
            mask = sources == source
            cumulative = taken[source] + np.cumsum(tokens[mask])
            crossing = int(np.searchsorted(cumulative, targets[source]))
            if crossing == len(cumulative):
                taken[source] = int(cumulative[-1]) if len(cumulative) else taken[source]
                continue
            before = int(cumulative[crossing - 1]) if crossing else taken[source]
            # Take the crossing document only if that lands nearer the target.
            take = crossing if cumulative[crossing] - targets[source] <= targets[source] - before else crossing - 1
            cutoffs[source] = int(ranks[mask][take]) if take >= 0 else -1
            open_sources.discard(source)
    return cutoffs


def keep_until_cutoff(batch: pa.Table, cutoffs: dict[str, int | None], seed: int) -> pa.Table:
    ranks = _rank(seed, batch.column("doc_id").to_pylist())
    limits = [cutoffs.get(source) for source in batch.column("source").to_pylist()]
    mask = [limit is None or int(rank) <= limit for rank, limit in zip(ranks, limits, strict=True)]
    return batch.filter(pa.array(mask, pa.bool_()))
