"""Training throughput: Ray Train + DeepSpeed (1 and 2 workers) against a plain single-process torch loop
on the same model, micro-batch and packed shards, in one run."""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest

from tests.benchmarks.conftest import BENCH_MODEL
from tests.conftest import TINY
from tests.training import fit

pytestmark = pytest.mark.benchmark
STEPS, WARMUP_STEPS, MICRO_BATCH = 30, 5, 8


def plain_torch_loop(cfg, shards: list[np.ndarray]) -> float:
    """Seconds per optimizer step of the same model and micro-batch in one process, no Ray, no DeepSpeed."""
    import torch

    from pipelines.model.llama import build_llama

    model = build_llama(cfg.train.model, cfg.run_dir() / "data" / "tokenizer", cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    times = []
    for step in range(STEPS):
        batch = torch.from_numpy(shards[step % len(shards)]).long()
        started = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times[WARMUP_STEPS:])


def ray_deepspeed(cfg, tmp_path, workers: int) -> float:
    """Seconds per optimizer step of the train stage's loop (Ray Data ingest included), median over reports."""
    import json

    from pipelines.train.config import TrainConfig

    config = TrainConfig.model_validate(
        {
            **cfg.train.model_dump(),
            "num_workers": workers,
            # The machine's cores split among the workers: Ray sizes each worker's torch threads by its CPUs.
            "cpus_per_worker": max(1, (os.cpu_count() or 2) // workers),
            "zero_stage": 2 if workers > 1 else 0,
            "micro_batch_size": MICRO_BATCH,
            "max_steps": STEPS,
            "log_every": WARMUP_STEPS,  # windows of 5 steps: reporting is part of the cost, as in a real run
            "checkpoint_every": STEPS,
            "eval_every": 0,
        }
    )
    _, history = fit(config, cfg, tmp_path, f"bench-{workers}")
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    times = [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > WARMUP_STEPS and not r.get("final")]
    return statistics.median(times)


def test_ray_train_deepspeed_against_a_plain_torch_loop(tmp_path, record_benchmark):
    import pyarrow.parquet as pq
    import ray

    from cluster.chain import run_stage
    from cluster.connect import connect
    from cluster.recipe import load_config

    cfg = load_config(
        TINY,
        [f"storage={tmp_path}", "run_name=throughput", "data.max_documents=300", *BENCH_MODEL,
         f"train.micro_batch_size={MICRO_BATCH}"],
    )  # fmt: skip
    connect(cfg.cluster)
    run_stage("data", cfg)
    ids = np.stack(pq.read_table(cfg.run_dir() / "data" / "train").column("input_ids").to_numpy(zero_copy_only=False))
    shards = [ids[i : i + MICRO_BATCH] for i in range(0, len(ids) - MICRO_BATCH + 1, MICRO_BATCH)]
    tokens_per_step = MICRO_BATCH * cfg.data.seq_len

    plain = plain_torch_loop(cfg, shards)
    one = ray_deepspeed(cfg, tmp_path, 1)
    two = ray_deepspeed(cfg, tmp_path, 2)
    ray.shutdown()
    rows = [
        {"setup": "plain torch loop, 1 process", "step_time_s": round(plain, 4), "tokens_per_s": round(tokens_per_step / plain)},
        {"setup": "Ray Train + DeepSpeed ZeRO-0, 1 worker", "step_time_s": round(one, 4), "tokens_per_s": round(tokens_per_step / one)},
        {"setup": "Ray Train + DeepSpeed ZeRO-2, 2 workers", "step_time_s": round(two, 4), "tokens_per_s": round(2 * tokens_per_step / two)},
    ]  # fmt: skip
    record_benchmark(
        "train_throughput",
        rows,
        one_worker_overhead=round(one / plain - 1, 3),
        micro_batch=MICRO_BATCH,
        seq_len=cfg.data.seq_len,
        steps_timed=STEPS - WARMUP_STEPS,
    )
