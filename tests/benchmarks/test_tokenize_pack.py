"""Tokenize + pack on Ray Data (actor pool) against `tokenizers` encode_batch in one process."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytestmark = pytest.mark.benchmark


def test_tokenize_pack_throughput(tmp_path, record_benchmark):
    import ray
    import ray.data
    from tokenizers import Tokenizer

    from cluster.config import ClusterConfig
    from cluster.connect import connect
    from pipelines.data.pack import Tokenize, pack
    from pipelines.data.readers import stdlib_files
    from pipelines.model.tokenizer import EOS_TOKEN, train_bpe

    texts = []
    for path in stdlib_files():
        try:
            texts.append(open(path, encoding="utf-8").read())
        except UnicodeDecodeError:
            continue
    tokenizer_dir = train_bpe(texts[:300], 4096, tmp_path / "tok")
    seq_len = 512

    # Baseline: the Rust tokenizer's batch encoding in this process, then the same packing.
    fast = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = fast.token_to_id(EOS_TOKEN)
    start = time.perf_counter()
    ids = [np.asarray(e.ids + [eos], dtype=np.int32) for e in fast.encode_batch(texts)]
    flat = np.concatenate(ids)
    baseline_rows = len(flat) // seq_len
    baseline_s = time.perf_counter() - start
    baseline_tokens = len(flat)

    connect(ClusterConfig(num_cpus=8))
    ds = ray.data.from_items([{"doc_id": f"{i:016x}", "text": t, "source": "stdlib"} for i, t in enumerate(texts)])
    ds = ds.materialize()
    start = time.perf_counter()
    tokenized = ds.map_batches(
        Tokenize,
        fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir)},
        batch_size=128,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=2),
    )
    packed = tokenized.map_batches(pack, fn_kwargs={"seq_len": seq_len}, batch_size=128, batch_format="pyarrow")
    ray_rows = packed.count()
    ray_s = time.perf_counter() - start
    ray.shutdown()

    assert abs(ray_rows - baseline_rows) <= len(texts) // 128 + 1  # per-batch tails differ only
    rows = [
        {
            "pipeline": "tokenizers encode_batch (1 process)",
            "tokens_per_s": baseline_tokens / baseline_s,
            "seconds": baseline_s,
        },
        {"pipeline": "Ray Data actor pool (2 actors)", "tokens_per_s": baseline_tokens / ray_s, "seconds": ray_s},
    ]
    record_benchmark(
        "tokenize_pack",
        rows,
        documents=len(texts),
        tokens=baseline_tokens,
        ray_over_baseline_throughput=round(baseline_s / ray_s, 3),
    )
