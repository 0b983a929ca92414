"""Helpers for tests and benchmarks that train: run a trainer with a side thread, find its workers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

from pipelines.runs import RunDir


def start_from_data_stage(source: Path, run_dir: Path) -> None:
    """Make ``run_dir`` a run whose data stage is ``source``'s (copied, with its manifest record), nothing after."""
    shutil.copytree(source / "data", run_dir / "data")
    manifest = RunDir(source).manifest()
    manifest["stages"] = {"data": manifest["stages"]["data"]}
    RunDir(run_dir).manifest_path.write_text(json.dumps(manifest))


def train_worker_pids() -> list[int]:
    import psutil

    pids = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if cmdline.startswith("ray::RayTrainWorker"):
            pids.append(process.pid)
    return pids


def reported_steps(history) -> list[int]:
    if not history.is_file():
        return []
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    return [int(row["step"]) for row in rows if not row.get("final")]


def fit(config, tiny_config, tmp_path, name, during=None):
    from pipelines.train.stage import metrics_log_callback
    from pipelines.train.trainer import build_trainer

    history = tmp_path / f"{name}.jsonl"
    trainer = build_trainer(
        config, RunDir(tiny_config.run_dir()), tiny_config.seed, tmp_path, name, [metrics_log_callback(history)]
    )
    stop = threading.Event()
    thread = threading.Thread(target=during, args=(history, stop), daemon=True) if during else None
    if thread:
        thread.start()
    try:
        return trainer.fit(), history
    finally:
        stop.set()
        if thread:
            thread.join(timeout=30)


#: The learning rate of the tests' short runs (10-12 steps) that assert a falling loss: at the tests' usual
#: 3e-3 ten steps drop the loss by 0.50, which one CPU's rounding put on either side of the 0.5 the tests ask.
SHORT_RUN_LR = 1e-2


def resume_config(train, steps: int, checkpoint_every: int):
    """The recipe's training setup, reporting every step and checkpointing every ``checkpoint_every``."""
    from pipelines.train.config import TrainConfig

    overrides = {
        "max_steps": steps,
        "warmup_steps": 2,
        "lr": SHORT_RUN_LR,
        "log_every": 1,
        "checkpoint_every": checkpoint_every,
    }
    # The sample ledger on: a resumed run's rows can be checked against this run's.
    return TrainConfig.model_validate({**train.model_dump(), **overrides, "max_failures": 2, "sample_ledger": True})


def killer(after_step: int, killed: dict):
    """A ``fit`` side thread: kill -9 one training worker once ``after_step`` has been reported."""

    def kill_one_worker(history, stop):
        while not stop.is_set():
            steps = reported_steps(history)
            pids = train_worker_pids() if max(steps, default=0) >= after_step else []
            if pids:
                killed["pid"], killed["step"], killed["at"] = pids[-1], max(steps), time.time()
                os.kill(pids[-1], signal.SIGKILL)
                return
            time.sleep(0.05)

    return kill_one_worker


#: How far a step's loss may move when it is trained again at another worker count from the same checkpoint: the
#: same rows and global batch, summed in another order (accumulation on fewer workers in place of an all-reduce).
RESIZE_TOLERANCE = 1e-4


def trained_at_two_sizes(reports: list[dict]) -> dict[int, list[tuple[int, float]]]:
    """The steps an elastic run reported at more than one worker count (trained again after a resize, from the
    same checkpoint): each one's (world size, loss) in report order."""
    by_step: dict[int, list[tuple[int, float]]] = {}
    for row in reports:
        by_step.setdefault(int(row["step"]), []).append((int(row["world_size"]), float(row["loss"])))
    return {step: runs for step, runs in by_step.items() if len({world for world, _ in runs}) > 1}


def loss_spread(again: dict[int, list[tuple[int, float]]]) -> dict[int, float]:
    """Per step of :func:`trained_at_two_sizes`, its largest loss minus its smallest."""
    return {step: max(loss for _, loss in runs) - min(loss for _, loss in runs) for step, runs in again.items()}


def trained_rows(ledger) -> list[tuple]:
    """(step, epoch, index in the epoch, token hash) of every micro-batch a run's final model trained on, from its
    sample ledger (``train.sample_ledger``; a restart's lines supersede the steps it trained again)."""
    from pipelines.train.ledger import read_ledger

    return [(row["step"], row["epoch"], row["index"], row["hash"]) for row in read_ledger(ledger)]


def planned_rows(data_dir, steps: int, batch: int, micro: int) -> list[tuple]:
    """(step, epoch, index in the epoch, token hash) of every micro-batch a run should train, read from the data
    stage's packed shards alone: the rows in order, ``batch // micro`` micro-batches a step, epochs of whole steps."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from pipelines.train.ledger import fingerprint

    table = pq.read_table(data_dir / "train")
    ids = np.stack(table.column("input_ids").to_numpy(zero_copy_only=False)).astype("int64")
    per_step = batch // micro
    steps_per_epoch = len(ids) // micro // per_step
    planned = []
    for step in range(1, steps + 1):
        epoch, in_epoch = divmod(step - 1, steps_per_epoch)
        for index in range(in_epoch * per_step, (in_epoch + 1) * per_step):
            planned.append(
                (step, epoch, index, fingerprint(torch.from_numpy(ids[index * micro : (index + 1) * micro])))
            )
    return planned


def lost_and_repeated(trained: list[tuple], planned: list[tuple]) -> tuple[int, int]:
    """Micro-batches of the plan its run never trained in their epoch, and micro-batches it trained more often than
    planned (rows of :func:`trained_rows` and :func:`planned_rows`; the step aside, which a test checks apart)."""
    from collections import Counter

    def per_epoch(rows: list[tuple]) -> Counter:
        return Counter((epoch, index, token_hash) for _, epoch, index, token_hash in rows)

    done, plan = per_epoch(trained), per_epoch(planned)
    return sum((plan - done).values()), sum((done - plan).values())


def sequence_accounts(accounts: list[tuple[int, int]], micro: int) -> dict[str, list[int]]:
    """A benchmark's quantities from one :func:`lost_and_repeated` pair per run: sequences (micro-batches times their
    size) lost, repeated, and both together."""
    return {
        "sequences lost": [lost * micro for lost, _ in accounts],
        "sequences repeated": [repeated * micro for _, repeated in accounts],
        "sequences lost or repeated": [(lost + repeated) * micro for lost, repeated in accounts],
    }


def watch_train_gauges(run_name: str, seen: list[float], done: threading.Event, grace_s: float = 30) -> None:
    """Scrape Ray's Prometheus endpoint until rank 0's step gauge for this run shows up (Ray exports metrics every
    few seconds), for as long as training runs (worker start-up and the held-out read come first: no fixed deadline
    fits) and a grace period after it."""
    from tests.metrics import SCRAPE_POLL_S, scrape, total

    deadline = None
    while not seen and (deadline is None or time.monotonic() < deadline):
        if deadline is None and done.is_set():
            deadline = time.monotonic() + grace_s
        samples = scrape()
        steps = [s.value for s in samples.get("ray_loom_train_step", []) if s.labels.get("run") == run_name]
        if steps and total(samples, "ray_loom_train_loss", run=run_name) > 0:
            seen.extend(steps)
        time.sleep(SCRAPE_POLL_S)
