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
