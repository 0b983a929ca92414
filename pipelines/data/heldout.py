"""Documents held out of training for the eval stage: a fixed sample per source, chosen by a hash.

The sample is the documents with the smallest hash of (seed, doc_id) in each source, so it does not
depend on the order of rows or the number of workers. Each block sends its own smallest few per source to
the driver (``per_source`` rows a source at most), which picks the overall smallest; the documents stay
where they are, and the training side is the kept set minus those ids.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.data.utils import arrow_tables

#: A small source keeps most of its documents for training: at most this share of it is held out.
MAX_SHARE = 0.1
_SEPARATOR = "\x1f"


def _ranks(seed: int, doc_ids: list[str]) -> np.ndarray:
    # Salted apart from the mix's rank, so the held-out sample and the mix cut are independent draws.
    return np.array(
        [
            int.from_bytes(hashlib.blake2b(f"heldout:{seed}:{d}".encode(), digest_size=8).digest(), "big")
            for d in doc_ids
        ],
        dtype=np.uint64,
    )


def _smallest(batch: pa.Table, per_source: int, seed: int) -> pa.Table:
    """Ray Data batch function: this block's ``per_source`` smallest ranks in each source, and its row counts."""
    ranked = pa.table(
        {
            "source": batch.column("source"),
            "doc_id": batch.column("doc_id"),
            "rank": pa.array(_ranks(seed, batch.column("doc_id").to_pylist()), pa.uint64()),
        }
    ).sort_by([("source", "ascending"), ("rank", "ascending"), ("doc_id", "ascending")])
    sources = ranked.column("source").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.concatenate([[True], sources[1:] != sources[:-1]])) if len(sources) else np.zeros(0, int)
    counts = np.diff(np.append(starts, len(sources)))
    within = np.arange(len(sources)) - np.repeat(starts, counts)
    # The batch's row count per source rides on that source's first row (0 on the others): sums stay right
    # when Ray Data puts several batches' outputs in one block.
    rows = np.where(within == 0, np.repeat(counts, counts), 0)
    return ranked.append_column("rows", pa.array(rows, pa.int64())).filter(pa.array(within < per_source))


def heldout_keys(kept, per_source: int, seed: int) -> list[str]:
    """The held-out documents' ``source<US>doc_id`` keys, sorted: each source's ``per_source`` smallest
    ranks, at most ``MAX_SHARE`` of the source."""
    if per_source == 0:
        return []
    blocks = arrow_tables(
        kept.map_batches(_smallest, fn_kwargs={"per_source": per_source, "seed": seed}, batch_format="pyarrow")
    )
    if not blocks:
        return []
    candidates = pa.concat_tables(blocks)
    sizes = {
        row["source"]: row["rows_sum"] for row in candidates.group_by("source").aggregate([("rows", "sum")]).to_pylist()
    }
    keys = []
    ordered = candidates.sort_by([("source", "ascending"), ("rank", "ascending"), ("doc_id", "ascending")])
    for source in sorted(sizes):
        take = min(per_source, int(sizes[source] * MAX_SHARE))
        rows = ordered.filter(pc.equal(ordered.column("source"), source)).slice(0, take)
        keys += [f"{source}{_SEPARATOR}{doc_id}" for doc_id in rows.column("doc_id").to_pylist()]
    return sorted(keys)


def _select(batch: pa.Table, keys: list[str], held: bool) -> pa.Table:
    """Ray Data batch function: the rows whose key is (``held``) or is not (not ``held``) among ``keys``."""
    key = pc.binary_join_element_wise(batch.column("source"), batch.column("doc_id"), _SEPARATOR)
    member = pc.is_in(key, value_set=pa.array(keys, pa.string()))
    return batch.filter(member if held else pc.invert(member))


def hold_out(kept, per_source: int, seed: int):
    """(the kept documents minus the held-out ones, the held-out documents as one small table)."""
    keys = heldout_keys(kept, per_source, seed)
    if not keys:
        return kept, None
    held_blocks = arrow_tables(
        kept.map_batches(_select, fn_kwargs={"keys": keys, "held": True}, batch_format="pyarrow")
    )
    held = pa.concat_tables(held_blocks).select(["doc_id", "source", "text"]).sort_by("doc_id") if held_blocks else None
    rest = kept.map_batches(_select, fn_kwargs={"keys": keys, "held": False}, batch_format="pyarrow")
    return rest, held


def write_heldout(held: pa.Table | None, path) -> int:
    """Write the held-out documents (a parquet file under ``path``); how many there are."""
    import pyarrow.parquet as pq

    if held is None or held.num_rows == 0:
        return 0
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(held, path / "documents.parquet")
    return held.num_rows
