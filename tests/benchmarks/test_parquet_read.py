"""Reading Loom's own parquet back: Ray Data 2.60's default reader against the file-based one Loom uses
(``pipelines/datasets.py``), in the same session on the same shards, each from two Ray tasks at once as
two training workers read their shards."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.benchmarks.conftest import best_time

pytestmark = pytest.mark.benchmark


def test_file_based_reader_against_datasource_v2(tmp_path, record_benchmark):
    import ray

    from cluster.config import ClusterConfig
    from cluster.connect import connect

    shards = tmp_path / "train"
    shards.mkdir()
    ids = np.random.default_rng(0).integers(0, 2048, size=(4096, 128), dtype=np.int32)
    pq.write_table(pa.table({"input_ids": list(ids)}), shards / "shard-0.parquet")  # ~ the tiny run's train shard

    connect(ClusterConfig(num_cpus=8))

    @ray.remote(num_cpus=1)
    def first_batch_s(path: str, loom_reader: bool) -> float:
        import ray.data

        from pipelines.datasets import read_parquet

        start = time.perf_counter()
        dataset = read_parquet(path) if loom_reader else ray.data.read_parquet(path)
        next(iter(dataset.iter_batches(batch_size=8)))
        return time.perf_counter() - start

    def both_workers(loom_reader: bool) -> float:
        return max(ray.get([first_batch_s.remote(str(shards), loom_reader) for _ in range(2)]))

    both_workers(True)  # worker processes started and Ray Data imported before either side is timed
    rows = []
    for name, loom_reader in (("datasource_v2 (Ray's default)", False), ("file-based (Loom)", True)):
        _, seconds = best_time(lambda loom_reader=loom_reader: both_workers(loom_reader))
        rows.append({"reader": name, "first_batch_s": seconds})
    ray.shutdown()
    assert rows[1]["first_batch_s"] < rows[0]["first_batch_s"]
    record_benchmark(
        "parquet_read",
        rows,
        speedup=round(rows[0]["first_batch_s"] / rows[1]["first_batch_s"], 1),
        shard_bytes=(shards / "shard-0.parquet").stat().st_size,
    )
