"""Helpers for tests and benchmarks that train: run a trainer with a side thread, find its workers."""

from __future__ import annotations

import json
import threading

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
    from pipelines.train.stage import build_trainer, metrics_log_callback

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
