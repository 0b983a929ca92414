"""Reading Loom's own parquet outputs back into Ray Data (the data stage's steps, the packed shards)."""

from __future__ import annotations

from typing import Any


def read_parquet(path: str, **kwargs: Any):
    """``ray.data.read_parquet`` through Ray Data's file-based parquet reader (``use_datasource_v2=False``).

    Ray 2.60's default reader (DataSourceV2) starts a pool of 32 footer-reading actors for every read,
    which on a small cluster costs tens of seconds of process start-up per dataset, and every training
    worker reads its own copy of the shards. Loom reads a few local files per dataset, where the
    file-based reader plans in the caller with no actors. The setting applies to this read only: it is
    taken when the read is planned, and the caller's DataContext is left as it was.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    before = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(path, **kwargs)
    finally:
        context.use_datasource_v2 = before


def blocks_by_size(paths: list[str]) -> dict[str, int]:
    """Read options for a data-stage input made of the local files ``paths``: ``override_num_blocks`` where Ray's
    own choice would be too many blocks; none where Ray should decide (a large input, or a file that is not local).

    Ray Data cuts every read into at least twice the cluster's CPUs (logical ones: 10 on the tests' cluster of two
    cores) whatever its size, below its own minimum block size (``DataContext.target_min_block_size``, 1 MiB). A
    few MB of documents then run as 20-150 tasks per operator and per shuffle partition, where start-up and
    scheduling cost far more than the work: the tiny recipe's 150 documents were read as 150 blocks and written
    as 91 files, which every later step read as 91 blocks. Below that floor an input gets a block per minimum
    block size of its files on disk (parquet: more in memory), at least two (two cores still share the work);
    above it Ray decides as it always does. Rows keep their order: fewer blocks only move the boundaries between
    the same files in the same order.
    """
    import os

    import ray
    import ray.data

    try:
        total = sum(os.path.getsize(path) for path in paths)
    except OSError:  # a remote URI, or a file gone meanwhile: Ray plans the read as it would
        return {}
    minimum = int(ray.data.DataContext.get_current().target_min_block_size or 0)
    if minimum <= 0:  # no minimum block size set: nothing to measure the input by
        return {}
    cpus = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else 1
    if total >= 2 * cpus * minimum:
        return {}
    # from_items truncates this to its item count itself; a read of fewer files splits their blocks.
    return {"override_num_blocks": max(2, -(-total // minimum))}
