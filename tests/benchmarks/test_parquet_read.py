"""Reading Loom's own parquet back: Ray Data 2.60's default reader against the file-based one Loom uses
(``pipelines/datasets.py``), in the same session on the same shards, each from two Ray tasks at once as
two training workers read their shards; three rounds, the two readers alternating."""

from __future__ import annotations

import statistics
import time
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.benchmarks.conftest import comparison, side_by_side

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
    runs = side_by_side({"datasource_v2": partial(both_workers, False), "file-based": partial(both_workers, True)})
    ray.shutdown()
    quantities = {
        "Ray default (datasource_v2) s": runs["datasource_v2"],
        "Loom file-based s": runs["file-based"],
    }
    assert statistics.median(runs["file-based"]) < statistics.median(runs["datasource_v2"])
    record_benchmark(
        "parquet_read",
        stage="train: data read-back",
        measure="seconds to the first batch of a packed shard, two Ray tasks at once",
        inputs={
            "rows": len(ids),
            "seq_len": ids.shape[1],
            "shard_bytes": (shards / "shard-0.parquet").stat().st_size,
            "readers_at_once": 2,
            "baseline": "ray.data.read_parquet (Ray 2.60's DataSourceV2)",
            "contender": "pipelines.datasets.read_parquet (file-based)",
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "first-batch seconds",
                "first-batch seconds, Loom's reader vs Ray's default",
                quantities,
                "Loom file-based s",
                "Ray default (datasource_v2) s",
                better="lower",
            ),
        ],  # fmt: skip
    )
