"""The DeepSpeed step of Loom's training loop (``pipelines.train.loop.build_engine``: the model, AdamW, the schedule,
DeepSpeed's config) on batches already in memory, timed per optimizer step. The throughput benchmark runs it alone
in a process of its own (no Ray) and inside a Ray Train worker (no Ray Data), between the plain torch loop and the
train stage, so that the extra time of a step is split into DeepSpeed's, Ray Train's and the stage's own.

Alone: ``python -m tests.benchmarks.deepspeed_loop < arguments.json`` (median_step_s's) prints the median."""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from typing import Any


def median_step_s(train: dict[str, Any], tokenizer_dir: str, seed: int, shards: list, steps: int, warmup: int) -> float:
    """Median seconds of an optimizer step after ``warmup`` steps (one micro-batch a step, world of one)."""
    import torch

    from pipelines.train.config import TrainConfig
    from pipelines.train.loop import build_engine

    engine, _, _ = build_engine(TrainConfig.model_validate(train), tokenizer_dir, seed, world=1)
    times = []
    for step in range(steps):
        batch = torch.as_tensor(shards[step % len(shards)]).long()
        started = time.perf_counter()
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        float(loss)  # the loop reads every micro-batch's loss
        times.append(time.perf_counter() - started)
    return statistics.median(times[warmup:])


def ray_train_worker(arguments: dict[str, Any]) -> None:
    """Ray Train's training function: the same steps, the median written to ``arguments["out"]`` (Ray Train 2.60's
    result keeps no metrics reported without a checkpoint)."""
    out = arguments.pop("out")
    with open(out, "w") as handle:
        json.dump({"median_step_s": median_step_s(**arguments)}, handle)


def _main() -> None:
    arguments = json.loads(sys.stdin.read())  # the batches are too long for a command line
    with socket.socket() as probe:  # torch.distributed of one rank, as DeepSpeed sets it up outside a launcher
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    print(json.dumps({"median_step_s": median_step_s(**arguments)}))


if __name__ == "__main__":
    _main()
