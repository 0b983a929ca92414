"""The eval stage: the trained model, and each compressed variant on the front, scored with
lm-evaluation-harness on tasks built from the run's held-out documents.

setup (held-out documents -> tasks) -> score each model (the harness's ``hf`` backend, in this process)
-> write (the harness's own result and sample files under ``harness/<model>/``, ``eval.json``, the figure).
Nothing is downloaded: the tasks are local JSON lines and the models are the run's own directories.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

from pipelines.artifacts import (
    CompressionFront,
    DataOutputs,
    EvalResults,
    EvalSummary,
    EvalTaskInfo,
    ModelScores,
    TrainedModel,
)
from pipelines.eval.config import EvalConfig
from pipelines.eval.harness import load, run_tasks, score
from pipelines.eval.metrics import export_gauges
from pipelines.progress import progress
from pipelines.runs import RunDir, StageResult

log = logging.getLogger(__name__)

BASE = "base"


def models_to_score(run: RunDir, with_variants: bool) -> dict[str, Path]:
    """The trained model, then each variant on the compression front (when compress ran)."""
    models = {BASE: TrainedModel.of(run).path}
    if with_variants:
        front = CompressionFront.of(run)
        models.update({name: front.variant_dir(name) for name in front.kept()})
    return models


def plot_scores(summary: EvalSummary, path: Path) -> Path:
    """One panel per task: each model's headline metric with the harness's standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary.tasks)
    models = [name for name, scores in summary.models.items() if scores.not_scored is None]
    figure, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for axis, task in zip(axes[0], names, strict=True):
        info = summary.tasks[task]
        scores = [summary.headline(task, model) for model in models]
        values = [s.value if s else 0.0 for s in scores]
        errors = [(s.stderr or 0.0) if s else 0.0 for s in scores]
        colours = ["#4c72b0" if model == BASE else "#dd8452" for model in models]
        axis.bar(range(len(models)), values, yerr=errors, color=colours, capsize=3)
        axis.set_xticks(range(len(models)), models, rotation=45, ha="right", fontsize=7)
        axis.set_title(f"{task.removeprefix('loom_')}\n{info.headline} ({info.better} is better)", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def headline(summary: EvalSummary) -> dict[str, float]:
    """The base model's headline metric per task (the stage's metrics, and what the demo prints)."""
    base = summary.models[BASE]
    return {
        f"{task}.{info.headline}": base.tasks[task][info.headline].value
        for task, info in summary.tasks.items()
        if info.headline in base.tasks.get(task, {})
    }


def run_eval(config: EvalConfig, run: RunDir, seed: int, with_variants: bool) -> StageResult:
    out = run.begin(EvalResults.stage)
    for half_written in (out / "tasks", out / "harness"):  # a crashed run's files: scored again
        shutil.rmtree(half_written, ignore_errors=True)
    results = EvalResults.at(run)
    data = DataOutputs.of(run)
    started = time.monotonic()
    tasks = run_tasks(data, config, out / "tasks", seed)
    models = models_to_score(run, with_variants and config.variants)
    log.info("eval: %d tasks (%s) for %d models", len(tasks), ", ".join(t.name for t in tasks), len(models))
    scores = {}
    with progress(len(models), "eval", "models") as bar:
        for name, path in models.items():
            bar.set_postfix_str(name)
            directory = out / "harness" / name
            directory.mkdir(parents=True)
            try:
                model = load(path, config, data.seq_len)
            except Exception as error:  # noqa: BLE001 -- any model the backend cannot load is reported, not raised
                if name == BASE:
                    raise RuntimeError(
                        f"eval: the harness's hf backend cannot load the trained model {path}"
                    ) from error
                # A variant transformers cannot load here (a vLLM-only format): said, not hidden.
                reason = f"the harness's hf backend could not load it: {type(error).__name__}: {error}"[:600]
                log.warning("eval: %s not scored: %s", name, reason)
                scores[name] = ModelScores(path=str(path), not_scored=reason)
            else:
                scores[name] = score(model, path, tasks, directory, seed)
                del model
            log.info("eval: %s done after %.0f s", name, time.monotonic() - started)
            bar.update(1)
    summary = EvalSummary(
        tasks={
            t.name: EvalTaskInfo(kind=t.kind, rows=t.rows, headline=t.headline, lower_is_better=t.lower_is_better)
            for t in tasks
        },
        models=scores,
    )
    results.summary_path.write_text(summary.model_dump_json(indent=2) + "\n")
    export_gauges(run.root.name, summary)
    plot = plot_scores(summary, run.root / "report" / "eval_scores.png")
    return StageResult(
        outputs={"summary": str(results.summary_path), "harness": str(out / "harness"), "plot": str(plot)},
        metrics={
            **headline(summary),
            "models_scored": sum(s.not_scored is None for s in scores.values()),
            "seconds": round(time.monotonic() - started, 1),
        },
    )
