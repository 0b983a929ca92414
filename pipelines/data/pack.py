"""Tokenize documents in an actor pool and pack the ids into fixed-length sequences."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa


class Tokenize:
    """Ray Data actor: loads the tokenizer once, appends EOS after every document.

    It calls the Rust ``tokenizers`` batch encoder directly (no transformers wrapper) and
    builds the Arrow list column from one flat buffer.
    """

    def __init__(self, tokenizer_dir: str):
        from pathlib import Path

        from tokenizers import Tokenizer

        from pipelines.model.tokenizer import EOS_TOKEN

        # tokenizers alone: importing transformers costs each actor seconds at start-up.
        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: data.tokenizer_path must hold a fast (tokenizer.json) tokenizer"
            )
        self.backend = Tokenizer.from_file(str(path))
        self.eos_id = self.backend.token_to_id(EOS_TOKEN)

    def __call__(self, batch: pa.Table) -> pa.Table:
        # encode_batch_fast: the same ids without character offsets, which nothing here reads.
        encoded = self.backend.encode_batch_fast(batch.column("text").to_pylist(), add_special_tokens=False)
        eos = np.array([self.eos_id], dtype=np.int32)
        # One numpy conversion per document, then one concatenate: a per-token Python loop was a second per 10M tokens.
        documents = [np.array(e.ids, dtype=np.int32) for e in encoded]
        flat = np.concatenate([part for ids in documents for part in (ids, eos)] or [eos[:0]])
        lengths = np.fromiter((len(ids) + 1 for ids in documents), dtype=np.int64, count=len(documents))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.table(
            {
                "doc_id": batch.column("doc_id"),
                "source": batch.column("source"),
                "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
                "num_tokens": pa.array(lengths, pa.int64()),
            }
        )


def pack(batch: pa.Table, seq_len: int) -> pa.Table:
    """Concatenate the batch's documents (each ends in EOS) and cut into ``seq_len`` rows.

    ``position_ids`` restart at 0 where a document starts (and at each row start): with
    them a trainer can keep attention inside documents (per-document causal masks, or
    varlen flash attention) instead of letting packed neighbours see each other.
    The tail shorter than ``seq_len`` is dropped; the stage reports how many tokens that cost.
    """
    lengths = batch.column("num_tokens").to_numpy()
    flat = batch.column("ids").combine_chunks().flatten().to_numpy()
    rows = len(flat) // seq_len
    index = np.arange(rows * seq_len)
    starts = np.zeros(rows * seq_len, dtype=bool)
    document_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    starts[document_starts[document_starts < rows * seq_len]] = True
    starts[::seq_len] = True
    positions = index - np.maximum.accumulate(np.where(starts, index, 0))
    row_offsets = pa.array(np.arange(0, rows * seq_len + 1, seq_len, dtype=np.int32))
    return pa.table(
        {
            "input_ids": pa.ListArray.from_arrays(row_offsets, pa.array(flat[: rows * seq_len])),
            "position_ids": pa.ListArray.from_arrays(row_offsets, pa.array(positions.astype(np.int32))),
        }
    )


#: The column packed rows are ordered by before the train/val split: a seeded hash of each row's tokens.
SHUFFLE_KEY = "_shuffle_key"


def with_shuffle_key(batch: pa.Table, seed: int) -> pa.Table:
    """``batch`` with :data:`SHUFFLE_KEY`: a seeded 64-bit hash of each row's ``input_ids``.

    Sorting by it shuffles the rows in an order set by their contents alone, where Ray's ``random_shuffle``
    orders them by the blocks they arrive in: those change with the cluster's size (a lost node, a read
    planned for fewer CPUs) and the shards would differ between two runs of the same input.
    """
    rows = len(batch)
    column = batch.column("input_ids").combine_chunks()
    seq_len = len(column[0]) if rows else 0
    lengths = np.diff(column.offsets.to_numpy())
    if column.null_count or (lengths != seq_len).any():
        raise ValueError("with_shuffle_key: packed rows must all hold seq_len tokens (pack's output)")
    ids = column.flatten().to_numpy().astype(np.uint64).reshape(rows, seq_len)
    weights = np.random.default_rng(seed).integers(1, 2**63, size=seq_len, dtype=np.uint64) | np.uint64(1)
    with np.errstate(over="ignore"):  # arithmetic mod 2**64 is the point
        key = (ids * weights).sum(axis=1, dtype=np.uint64)
        # splitmix64's finaliser: every input bit moves every output bit
        key ^= key >> np.uint64(30)
        key *= np.uint64(0xBF58476D1CE4E5B9)
        key ^= key >> np.uint64(27)
        key *= np.uint64(0x94D049BB133111EB)
        key ^= key >> np.uint64(31)
    return batch.append_column(SHUFFLE_KEY, pa.array(key, pa.uint64()))


def packed_in_order(tokenized, seq_len: int, batch_size: int, seed: int):
    """The tokenized documents (a Ray Dataset, in order) packed into ``seq_len`` rows and shuffled by ``seed``:
    the same rows in the same order whatever blocks the input came in and however many nodes ran it.

    Packing drops each batch's tail, so its batches are fixed runs of ``batch_size`` documents (exact blocks, in
    order) rather than whatever blocks the cluster's size made; the shuffle is by content for the same reason.
    """
    return (
        tokenized.repartition(target_num_rows_per_block=batch_size, strict=True)
        .map_batches(pack, fn_kwargs={"seq_len": seq_len}, batch_size=batch_size, batch_format="pyarrow")
        .map_batches(with_shuffle_key, fn_kwargs={"seed": seed}, batch_format="pyarrow")
        .sort(SHUFFLE_KEY)
        .drop_columns([SHUFFLE_KEY])
    )


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


@dataclass(frozen=True)
class MixCut:
    """Per source cut by the mix: the largest rank kept (-1: none; None: the whole source) and the
    tokens kept, exactly, so the cut need not be counted again."""

    cutoffs: dict[str, int | None]
    tokens: dict[str, int]


def mix_cutoffs(tokenized, targets: dict[str, int], seed: int) -> MixCut:
    """Per source, the largest rank to keep so its kept tokens come closest to its target.

    Documents are taken in a random (hashed) order until the source's token target is
    reached: exact to one document, where sampling documents with a probability misses
    by whole large documents. The ranks are sorted across the cluster and streamed to
    the driver a batch at a time (three small columns), so memory stays bounded.
    ``targets`` names only the sources to cut.
    """
    ranked = tokenized.map_batches(with_rank, fn_kwargs={"seed": seed}, batch_format="pyarrow").sort("rank")
    return cut_ranked(ranked.iter_batches(batch_format="pyarrow"), targets)


def cut_ranked(batches: Iterable[pa.Table], targets: dict[str, int]) -> MixCut:
    """``mix_cutoffs`` over (source, rank, num_tokens) batches in ascending rank order."""
    taken = dict.fromkeys(targets, 0)
    last_rank = dict.fromkeys(targets, -1)
    cutoffs: dict[str, int | None] = dict.fromkeys(targets)
    open_sources = set(targets)
    for batch in batches:
        if not open_sources:
            break
        sources = np.asarray(batch.column("source").to_pylist(), dtype=object)
        ranks, tokens = batch.column("rank").to_numpy(), batch.column("num_tokens").to_numpy()
        for source in list(open_sources):
            mask = sources == source
            if not mask.any():
                continue
            source_ranks, cumulative = ranks[mask], taken[source] + np.cumsum(tokens[mask])
            crossing = int(np.searchsorted(cumulative, targets[source]))
            if crossing == len(cumulative):
                taken[source], last_rank[source] = int(cumulative[-1]), int(source_ranks[-1])
                continue
            before = int(cumulative[crossing - 1]) if crossing else taken[source]
            # Take the crossing document only if that lands nearer the target; not taking the first
            # document of a batch keeps the earlier batches' documents (the last rank taken).
            if cumulative[crossing] - targets[source] <= targets[source] - before:
                cutoffs[source], taken[source] = int(source_ranks[crossing]), int(cumulative[crossing])
            elif crossing:
                cutoffs[source], taken[source] = int(source_ranks[crossing - 1]), before
            else:
                cutoffs[source] = last_rank[source]
            open_sources.discard(source)
    return MixCut(cutoffs=cutoffs, tokens=taken)


def keep_until_cutoff(batch: pa.Table, cutoffs: dict[str, int | None], seed: int) -> pa.Table:
    ranks = _rank(seed, batch.column("doc_id").to_pylist())
    limits = [cutoffs.get(source) for source in batch.column("source").to_pylist()]
    mask = [limit is None or int(rank) <= limit for rank, limit in zip(ranks, limits, strict=True)]
    return batch.filter(pa.array(mask, pa.bool_()))
