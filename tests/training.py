"""Helpers for tests and benchmarks that train: run a trainer with a side thread, find its workers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from pipelines.runs import RunDir


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


#: The kill/resume test's run: long enough to checkpoint, be killed after step 6 and resume from step 4.
RESUME_STEPS, RESUME_CHECKPOINT_EVERY = 12, 4
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
    # The sample ledger on: the resized run's rows are checked against this run's (tests/ray/test_train_resume.py).
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
