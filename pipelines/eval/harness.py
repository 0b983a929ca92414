"""lm-evaluation-harness as Loom uses it, shared by every scorer of the run's tasks (the eval stage, a sweep
judged by an eval task, ``loom eval --endpoint``): the harness's environment, the tasks built from the held-out
documents, the ``hf`` backend for a model directory, and one model scored into the harness's own files.
Reads only the data stage's outputs, so a stage that scores a model names no other stage's artifacts."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from pipelines.artifacts import DataOutputs, ModelScores, TaskScore
from pipelines.eval.config import EvalConfig
from pipelines.eval.tasks import HeldOutDocument, Task, build_tasks

#: The harness reads its task data with ``datasets``: offline, so a missing file is an error, not a download;
#: its progress bars go to the harness's log, not the terminal (the stage has its own line).
HARNESS_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
BOOTSTRAP_ITERS = 100


def read_heldout(outputs: DataOutputs) -> list[HeldOutDocument]:
    import pyarrow.parquet as pq

    if not outputs.heldout.is_dir():
        raise FileNotFoundError(
            f"{outputs.heldout} is missing: the data stage held no document out (data.heldout_documents is 0, or the "
            "run's data stage is from before held-out documents); rerun `loom data --force` with data.heldout_documents > 0"
        )
    table = pq.read_table(outputs.heldout)
    return [HeldOutDocument(**row) for row in table.select(["doc_id", "source", "text"]).to_pylist()]


def harness_environment() -> None:
    """The harness's environment in this process: offline, its progress bars off the terminal."""
    for name, value in HARNESS_ENV.items():
        os.environ.setdefault(name, value)


def run_tasks(data: DataOutputs, config: EvalConfig, root: Path, seed: int) -> list[Task]:
    """The run's tasks, built under ``root`` from its held-out documents, with the harness's environment set."""
    harness_environment()
    if config.continuation_chars > data.seq_len:
        config = config.model_copy(update={"continuation_chars": data.seq_len})
    return build_tasks(read_heldout(data), config, root, seed)


def _metrics(reported: dict[str, Any]) -> dict[str, TaskScore]:
    """The harness's ``{"acc,none": 0.5, "acc_stderr,none": 0.1, ...}`` as {metric: score}."""
    scores = {}
    for key, value in reported.items():
        metric, _, filter_name = key.partition(",")
        if not filter_name or metric.endswith("_stderr") or not isinstance(value, int | float):
            continue
        stderr = reported.get(f"{metric}_stderr,{filter_name}")
        scores[metric] = TaskScore(
            value=float(value), stderr=float(stderr) if isinstance(stderr, int | float) else None
        )
    return scores


def load(path: Path, config: EvalConfig, seq_len: int):
    """The harness's ``hf`` model for a directory, scoring at most ``seq_len`` tokens at once (the
    context the model was trained on; its position table may be longer)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=str(path),
        dtype="float32",
        device="cuda" if torch.cuda.is_available() else "cpu",
        batch_size=config.batch_size,
        max_length=seq_len,
    )


def score(model, path: Path, tasks: list[Task], out: Path, seed: int) -> ModelScores:
    """One loaded model through the harness; its result and per-sample files written under ``out``."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    tracker = EvaluationTracker(output_path=str(out))
    # The harness draws a tqdm bar on stderr per request type: kept in its log beside its results.
    with open(out / "harness.log", "w") as harness_log, contextlib.redirect_stderr(harness_log):
        results = lm_eval.simple_evaluate(
            model=model,
            tasks=[task.harness_config(out.parent / "datasets-cache") for task in tasks],
            task_manager=TaskManager(include_defaults=False),
            # Only non-mean metrics are bootstrapped, and none of Loom's tasks' can be: a token count.
            bootstrap_iters=BOOTSTRAP_ITERS,
            log_samples=True,
            evaluation_tracker=tracker,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in results["configs"]:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    written = sorted(out.rglob("results_*.json"))
    return ModelScores(
        path=str(path),
        tasks={task.name: _metrics(results["results"].get(task.name, {})) for task in tasks},
        harness_results=str(written[-1]) if written else None,
    )
