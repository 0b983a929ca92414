"""The training stage: a Ray Train TorchTrainer whose workers each run a DeepSpeed engine.

Outputs under ``<run>/train/``: ``ray/`` (Ray Train's run directory with its
checkpoints: DeepSpeed engine, optimizer, scheduler and data position) and
``model/``, a Hugging Face directory that transformers and vLLM load.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from pipelines.artifacts import DataOutputs, TrainedModel
from pipelines.progress import follow_steps
from pipelines.runs import RunDir, StageResult, hash_dir, hash_files
from pipelines.train.config import TrainConfig
from pipelines.train.trainer import build_trainer, copy_export, while_fitting

log = logging.getLogger(__name__)


def metrics_log_callback(path: Path):
    """A Ray Train callback appending rank 0's metrics of every report to a JSON-lines file.

    ``Result.metrics_dataframe`` only holds reports that carried a checkpoint; the
    loss curve needs every report.
    """
    import ray.train

    class MetricsLog(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            row = {**metrics[0], "reported_at": time.time()}  # wall clock: recovery time after a failure
            with open(path, "a") as handle:
                handle.write(json.dumps(row, default=float) + "\n")

    return MetricsLog()


def read_loss_curve(path: Path) -> list[dict[str, float]]:
    """One point per step (training loss, and held-out loss where evaluated); a resume may
    repeat steps and the last report wins; the final report repeats the last loss and is skipped."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_step: dict[int, dict[str, float]] = {}
    for row in rows:
        if "loss" in row and not row.get("final"):
            point = {"step": int(row["step"]), "loss": float(row["loss"])}
            if "val_loss" in row:
                point["val_loss"] = float(row["val_loss"])
            by_step[point["step"]] = point
    return [by_step[step] for step in sorted(by_step)]


def plot_loss(curve: list[dict[str, float]], path: Path, title: str, final_val_loss: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker=".", label="training loss")
    evaluated = [p for p in curve if "val_loss" in p]
    if final_val_loss is not None and curve:
        evaluated.append({"step": curve[-1]["step"], "val_loss": final_val_loss})
    if evaluated:
        ax.plot([p["step"] for p in evaluated], [p["val_loss"] for p in evaluated], marker="o", label="held-out loss")
    ax.set(xlabel="optimizer step", ylabel="loss (mean over workers)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def train_inputs(config: TrainConfig, run: RunDir) -> dict[str, str]:
    """Content hashes of what the stage reads: the packed shards and tokenizer, or the SFT pairs; the start model."""
    hashes = {}
    if config.sft is not None:
        path = Path(config.sft.path).expanduser()
        hashes["sft_pairs"] = hash_dir(path) if path.is_dir() else hash_files([path], root=path.parent)
    else:
        data = DataOutputs.of(run)
        hashes.update(train_shards=hash_dir(data.train), tokenizer=hash_dir(data.tokenizer))
    if config.init_from is not None:
        hashes["init_from"] = hash_dir(Path(config.init_from))
    return hashes


def run_train(config: TrainConfig, run: RunDir, seed: int) -> StageResult:
    out = run.begin("train")
    inputs = train_inputs(config, run)
    # Rerunning with the same storage path and name resumes from Ray Train's latest checkpoint.
    history = out / "metrics.jsonl"
    trainer = build_trainer(
        config, run, seed, storage_path=out, name="ray", callbacks=[metrics_log_callback(history)], bounded_wait=True
    )
    with follow_steps(history, config.max_steps, "train"), while_fitting(config):
        result = trainer.fit()
    model_dir = copy_export(result, TrainedModel.at(run).path)

    curve = read_loss_curve(history)
    plot = plot_loss(
        curve, run.root / "report" / "train_loss.png", f"{run.root.name}: loss", result.metrics.get("val_loss")
    )
    kept = ("step", "val_loss", "val_perplexity", "initial_val_loss", "initial_val_perplexity")
    metrics = {k: v for k, v in result.metrics.items() if k in kept}
    if curve:
        metrics["first_loss"], metrics["last_loss"] = curve[0]["loss"], curve[-1]["loss"]
    outputs = {
        "model": str(model_dir),
        "model_hash": hash_dir(model_dir),  # what the stages built on it key on (TrainedModel.fingerprint)
        "checkpoints": str(out / "ray"),
        "metrics": str(history),
        "loss_plot": str(plot),
    }
    if (model_dir / "adapter").is_dir():
        outputs["adapter"] = str(model_dir / "adapter")
    return StageResult(inputs=inputs, outputs=outputs, metrics=metrics)
