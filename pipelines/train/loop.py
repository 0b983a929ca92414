"""What each Ray Train worker runs: one DeepSpeed rank over its shard of the packed data.

The loop config crosses the process boundary as a plain dict and is validated
again here; nothing is read from module globals of the driver.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

FINAL_EXPORT_MARKER = "LOOM_FINAL_EXPORT"
DS_TAG = "deepspeed"


def warmup_cosine(warmup_steps: int, max_steps: int, floor: float = 0.1):
    """LR multiplier: linear warmup, then cosine decay to ``floor`` of the peak."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _batches(shard, micro_batch_size: int, skip: int):
    """Micro-batches of ``input_ids`` from the shard, skipping the first ``skip`` (data position)."""
    import numpy as np
    import torch

    def collate(batch: dict[str, Any]):
        return torch.from_numpy(np.stack(batch["input_ids"]).astype(np.int64))

    for index, batch in enumerate(
        shard.iter_torch_batches(batch_size=micro_batch_size, collate_fn=collate, drop_last=True)
    ):
        if index >= skip:
            yield batch


def _mean_across_ranks(value: float) -> float:
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return float(tensor.item())


def evaluate(engine, shard, micro_batch_size: int, max_batches: int = 50) -> float:
    """Mean held-out loss across ranks (every rank runs the same number of batches)."""
    import torch

    losses = []
    engine.eval()
    with torch.no_grad():
        for index, batch in enumerate(_batches(shard, micro_batch_size, 0)):
            if index >= max_batches:
                break
            batch = batch.to(engine.device)
            losses.append(float(engine(input_ids=batch, labels=batch).loss))
    engine.train()
    local = sum(losses) / len(losses) if losses else float("nan")
    return _mean_across_ranks(local)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch

    from pipelines.model.llama import build_llama, count_parameters, export_hf
    from pipelines.train.config import TrainConfig
    from pipelines.train.deepspeed_config import deepspeed_config

    config = TrainConfig.model_validate(loop_config["train"])
    seed: int = loop_config["seed"]
    tokenizer_dir: str = loop_config["tokenizer_dir"]
    context = ray.train.get_context()
    rank = context.get_world_rank()

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if (Path(directory) / FINAL_EXPORT_MARKER).exists():
                return  # Training already finished; the export is the latest checkpoint.

    model = build_llama(config.model, tokenizer_dir, seed)
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.max_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config)
    )

    # Data position: micro-batches consumed in the current epoch, saved with every checkpoint.
    epoch, position = 0, 0
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            _, client_state = engine.load_checkpoint(directory, tag=DS_TAG)
        epoch, position = client_state["epoch"], client_state["data_position"]

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if loop_config["has_val"] else None
    tokens_per_step = config.effective_global_batch_size * loop_config["seq_len"]
    window_start, window_steps = time.perf_counter(), 0
    loss_sum, loss_count = 0.0, 0
    last_loss = float("nan")

    while engine.global_steps < config.max_steps:
        epoch_start_position = position
        for batch in _batches(train_shard, config.micro_batch_size, position):
            batch = batch.to(engine.device)
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            steps_before = engine.global_steps
            engine.step()
            position += 1
            loss_sum, loss_count = loss_sum + float(loss), loss_count + 1
            if engine.global_steps == steps_before:
                continue  # inside a gradient accumulation window
            step = engine.global_steps
            window_steps += 1
            last = step >= config.max_steps
            if step % config.log_every and step % config.checkpoint_every and not last:
                continue
            elapsed = time.perf_counter() - window_start
            metrics = {
                "step": step,
                "epoch": epoch,
                "loss": _mean_across_ranks(loss_sum / loss_count),
                "lr": scheduler.get_last_lr()[0],
                "step_time_s": elapsed / window_steps,
                "tokens_per_s": tokens_per_step * window_steps / elapsed,
                "parameters": count_parameters(engine.module),
            }
            last_loss = metrics["loss"]
            window_start, window_steps, loss_sum, loss_count = time.perf_counter(), 0, 0.0, 0
            if step % config.checkpoint_every == 0 or last:
                with tempfile.TemporaryDirectory() as directory:
                    engine.save_checkpoint(
                        directory, tag=DS_TAG, client_state={"epoch": epoch, "data_position": position, "step": step}
                    )
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
            else:
                ray.train.report(metrics)
            if last:
                break
        else:
            if position == epoch_start_position == 0:
                raise RuntimeError(
                    f"rank {rank}: the training shard holds fewer than micro_batch_size="
                    f"{config.micro_batch_size} sequences; add data or lower train.micro_batch_size"
                )
            epoch, position = epoch + 1, 0
            continue
        break

    # "loss" repeats the last training loss so that every report carries it (Tune's searchers require that).
    final: dict[str, Any] = {"step": engine.global_steps, "final": True, "loss": last_loss}
    if val_shard is not None:
        val_loss = evaluate(engine, val_shard, config.micro_batch_size)
        final.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)))

    # ZeRO-3 shards parameters across ranks: gathering them is a collective every rank joins.
    state_dict = engine._zero3_consolidated_16bit_state_dict() if config.zero_stage == 3 else None
    with tempfile.TemporaryDirectory() as directory:
        export = None
        if rank == 0:
            source = engine.module.state_dict() if state_dict is None else state_dict
            export_hf(engine.module, source, tokenizer_dir, directory)
            (Path(directory) / FINAL_EXPORT_MARKER).write_text(f"pid {os.getpid()}\n")
            export = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(final, checkpoint=export)
