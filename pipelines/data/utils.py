"""Helpers several data steps share: the broadcast-or-shuffle join, the local-components bound and the shuffle
strategy (``data.shuffle``, and the hash shuffle uint64 keys need).

A leaf module: it imports no other Loom module, and numpy, pyarrow and Ray only where they are
used, so the steps, the components algorithm and the step configs (read with every recipe,
which should not pay for numpy) all import it without importing each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

#: Candidate graphs of at most this many edges finish connected components in one process (32 MB).
LOCAL_EDGES = 2_000_000

#: Right-hand sides of joins up to this many rows are sent to every task instead of shuffled.
BROADCAST_ROWS = 5_000_000

#: Right-hand sides with wide columns (shingle sets) are broadcast up to this many bytes.
BROADCAST_BYTES = 1 << 30


@contextlib.contextmanager
def shuffled_by(choice: Literal["default", "sort"]) -> Iterator[None]:
    """``data.shuffle``: Ray Data's shuffle strategy for the datasets created inside (each keeps a copy of the
    context), put back afterwards: the context is the process's, and a caller's own datasets keep Ray's choice."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    context = ray.data.DataContext.get_current()
    before = context.shuffle_strategy
    if choice == "sort":
        context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        yield
    finally:
        context.shuffle_strategy = before


def hash_shuffled(ds):
    """``ds``, with Ray Data's hash shuffle for every dataset derived from it (each copies its parent's context),
    whatever ``data.shuffle`` chose: for group-bys on uint64 keys (hashes, node ids). Ray Data 2.60's sort-based
    aggregation turns such a column with values above 2**63 into pickled Python objects, which Arrow then fails to
    sort ("Unsupported type for RecordBatch sorting")."""
    from ray.data.context import ShuffleStrategy

    ds.context.shuffle_strategy = ShuffleStrategy.SHUFFLE_V2
    return ds


def _lookup(table: pa.Table, on: str, keys: np.ndarray, values: dict[str, np.ndarray], how: str) -> pa.Table:
    import numpy as np
    import pyarrow as pa

    left = table.column(on).to_numpy()
    index = np.searchsorted(keys, left).clip(0, max(len(keys) - 1, 0))
    found = (keys[index] == left) if len(keys) else np.zeros(len(left), dtype=bool)
    if how == "inner":
        table, index = table.filter(pa.array(found)), index[found]
        for name, column in values.items():
            table = table.append_column(name, pa.array(column[index]))
        return table
    for name, column in values.items():
        table = table.append_column(name, pa.array(column[index], mask=~found))
    return table


def arrow_tables(ds) -> list[pa.Table]:
    """A dataset's non-empty blocks as Arrow tables in the driver (for sides small enough to hold there)."""
    import ray

    return [table for table in ray.get(ds.to_arrow_refs()) if table.num_rows]


def small_side_join(left, right, on: str, how: str, num_partitions: int, limit: int = BROADCAST_ROWS):
    """``left`` joined with ``right`` on one unsigned integer key (``how``: "inner" or "left_outer").

    A broadcast join when ``right`` is small (duplicate clusters and shared buckets usually
    are): the big side, which carries the document texts, is not shuffled. Ray Data's
    hash-shuffle join otherwise, as Spark picks between the two.
    """
    import pyarrow as pa

    rows = right.count()
    if rows > limit:
        return left.join(right, join_type=how, num_partitions=num_partitions, on=(on,))
    if rows == 0 and how == "inner":
        return left.limit(0)
    if rows == 0:
        raise ValueError("small_side_join: an empty right side has no columns to add; skip the join instead")
    table = pa.concat_tables(arrow_tables(right)).sort_by(on)
    keys = table.column(on).to_numpy()
    values = {name: table.column(name).to_numpy() for name in table.column_names if name != on}
    return left.map_batches(
        _lookup, fn_kwargs={"on": on, "keys": keys, "values": values, "how": how}, batch_format="pyarrow"
    )
