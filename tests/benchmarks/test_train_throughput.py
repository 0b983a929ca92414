"""Training throughput: Ray Train + DeepSpeed (1 and 2 workers) against a plain single-process torch loop
on the same model, micro-batch and packed shards, in one run: three rounds, the setups alternating. Between them,
to say where a step's extra time goes: DeepSpeed's step alone (one process, no Ray) and inside a Ray Train worker
on batches in memory (no Ray Data): tests/benchmarks/deepspeed_loop.py."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import numpy as np
import pytest

from tests.benchmarks.conftest import BENCH_MODEL, comparison, side_by_side
from tests.conftest import REPO_ROOT, TINY
from tests.training import fit

pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(2400)]
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


def engine_arguments(cfg, shards: list[np.ndarray]) -> dict:
    """deepspeed_loop.median_step_s's arguments: the stage's 1-worker setup (ZeRO-0), the same batches."""
    train = {**cfg.train.model_dump(), "num_workers": 1, "zero_stage": 0, "micro_batch_size": MICRO_BATCH}
    return {
        "train": {**train, "max_steps": STEPS},
        "tokenizer_dir": str(cfg.run_dir() / "data" / "tokenizer"),
        "seed": cfg.seed,
        "shards": [shard.tolist() for shard in shards[:STEPS]],
        "steps": STEPS,
        "warmup": WARMUP_STEPS,
    }


def deepspeed_alone(cfg, shards: list[np.ndarray]) -> float:
    """Seconds per step of DeepSpeed's engine in a process of its own: no Ray, batches in memory."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.deepspeed_loop"], input=json.dumps(engine_arguments(cfg, shards)),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])["median_step_s"]


def deepspeed_in_ray_train(cfg, shards: list[np.ndarray], tmp_path) -> float:
    """Seconds per step of the same engine in a Ray Train worker with the machine's CPUs: no Ray Data, no reports."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from tests.benchmarks.deepspeed_loop import ray_train_worker

    name = f"engine-{next(RUN_NUMBERS)}"
    out = tmp_path / f"{name}.json"
    trainer = TorchTrainer(
        ray_train_worker,
        train_loop_config={**engine_arguments(cfg, shards), "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": os.cpu_count() or 1}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(tmp_path / "engine")),
    )
    trainer.fit()
    return json.loads(out.read_text())["median_step_s"]


#: Each training run's own name (and history file): a later round must not resume an earlier one's checkpoint.
RUN_NUMBERS = itertools.count()


def ray_deepspeed(cfg, tmp_path, workers: int) -> tuple[float, float, float]:
    """Seconds per optimizer step of the train stage's loop (Ray Data ingest included), median over reports, and
    of those the seconds rank 0 waited for data and spent reporting (the report's seconds spread over its window)."""
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
    _, history = fit(config, cfg, tmp_path, f"bench-{workers}-{next(RUN_NUMBERS)}")
    rows = [json.loads(line) for line in history.read_text().splitlines()]
    reports = [r for r in rows if "step_time_s" in r and r["step"] > WARMUP_STEPS and not r.get("final")]
    return (
        statistics.median(r["step_time_s"] for r in reports),
        statistics.median(r["data_wait_s"] for r in reports),
        statistics.median(r["last_report_s"] / WARMUP_STEPS for r in reports),  # one report per WARMUP_STEPS steps
    )


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

    runs = side_by_side(
        {
            "plain": partial(plain_torch_loop, cfg, shards),
            "deepspeed": partial(deepspeed_alone, cfg, shards),
            "ray_train": partial(deepspeed_in_ray_train, cfg, shards, tmp_path),
            "one": partial(ray_deepspeed, cfg, tmp_path, 1),
            "two": partial(ray_deepspeed, cfg, tmp_path, 2),
        }
    )
    ray.shutdown()
    quantities = {
        "plain torch s/step": runs["plain"],
        "DeepSpeed alone s/step": runs["deepspeed"],
        "DeepSpeed in a Ray Train worker s/step": runs["ray_train"],
        "Ray 1 worker s/step": [step for step, _, _ in runs["one"]],
        "Ray 2 workers s/step": [step for step, _, _ in runs["two"]],
        "plain torch tokens/s": [tokens_per_step / s for s in runs["plain"]],
        "Ray 1 worker tokens/s": [tokens_per_step / step for step, _, _ in runs["one"]],
        "Ray 2 workers tokens/s": [2 * tokens_per_step / step for step, _, _ in runs["two"]],
        # Where the 1-worker run's extra time per step goes: the data wait and the report are Loom's and Ray's.
        "Ray 1 worker data wait s/step": [wait for _, wait, _ in runs["one"]],
        "Ray 1 worker report s/step": [report for _, _, report in runs["one"]],
    }
    record_benchmark(
        "train_throughput",
        stage="train",
        measure="tokens/s: Ray Train + DeepSpeed vs a plain single-process torch loop, same model and batches",
        inputs={
            "model": "4 layers x 256 wide, 4 heads, MLP 1024 (~3.7M parameters)",
            "micro_batch": MICRO_BATCH,
            "seq_len": cfg.data.seq_len,
            "steps": STEPS,
            "steps_timed": STEPS - WARMUP_STEPS,
            "statistic_per_run": "median step time after the warm-up steps",
            "setups": {
                "plain torch": "1 process, AdamW + clipping, the machine's threads",
                "DeepSpeed alone": "the stage's engine (ZeRO-0, 1 rank) in 1 process, no Ray, batches in memory",
                "DeepSpeed in a Ray Train worker": "the same in a Ray Train worker with all CPUs, no Ray Data",
                "Ray 1 worker": f"ZeRO-0, 1 worker with {os.cpu_count()} CPUs, Ray Data ingest and reports included",
                "Ray 2 workers": f"ZeRO-2, 2 workers with {max(1, (os.cpu_count() or 2) // 2)} CPU(s) each",
            },
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "tokens/s, 1 worker vs plain torch",
                "tokens/s, 1 Ray worker vs plain torch",
                quantities,
                "Ray 1 worker tokens/s",
                "plain torch tokens/s",
            ),
            comparison(
                "DeepSpeed's share: its engine alone vs plain torch",
                "seconds per step, DeepSpeed's engine in one process over the plain torch loop's",
                quantities,
                "DeepSpeed alone s/step",
                "plain torch s/step",
                better="lower",
            ),
            comparison(
                "Ray Train's share: the engine in a Ray Train worker vs alone",
                "seconds per step, the engine in a Ray Train worker (no Ray Data) over the engine alone",
                quantities,
                "DeepSpeed in a Ray Train worker s/step",
                "DeepSpeed alone s/step",
                better="lower",
            ),
            comparison(
                "the stage's share: the train stage's loop vs the engine in a Ray Train worker",
                "seconds per step, the 1-worker train stage (Ray Data ingest, reports) over the bare engine in a worker",
                quantities,
                "Ray 1 worker s/step",
                "DeepSpeed in a Ray Train worker s/step",
                better="lower",
            ),
            comparison(
                "1 worker: share of a step waiting for data",
                "seconds per step the Ray worker waited for its next micro-batch, over its step time",
                quantities,
                "Ray 1 worker data wait s/step",
                "Ray 1 worker s/step",
                better="lower",
            ),
            comparison(
                "1 worker: share of a step reporting",
                "seconds per step of ray.train.report (one a window of 5 steps), over the step time",
                quantities,
                "Ray 1 worker report s/step",
                "Ray 1 worker s/step",
                better="lower",
            ),
            comparison(
                "tokens/s, 2 workers vs plain torch",
                "tokens/s, 2 Ray workers (ZeRO-2) vs plain torch",
                quantities,
                "Ray 2 workers tokens/s",
                "plain torch tokens/s",
            ),
        ],  # fmt: skip
    )
