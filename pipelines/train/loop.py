"""What each Ray Train worker runs: one DeepSpeed rank over its shard of the packed data.

The loop config crosses the process boundary as a plain dict and is validated
again here; nothing is read from module globals of the driver.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

FINAL_EXPORT_MARKER = "LOOM_FINAL_EXPORT"
#: Written next to the DeepSpeed state: what a restart must agree with before loading it.
RUN_STATE = "loom_state.json"
DS_TAG = "deepspeed"


def warmup_cosine(warmup_steps: int, max_steps: int, floor: float = 0.1):
    """LR multiplier: linear warmup, then cosine decay to ``floor`` of the peak."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _batches(shard, micro_batch_size: int, skip: int, rank: int = 0, world: int = 1):
    """This rank's micro-batches of ``input_ids``, after the first ``skip`` rounds (the data position).

    Every worker streams the whole dataset in the same order and takes every ``world``-th
    micro-batch: which rows a rank trains on, and in which step, is then fixed by the data
    alone, so a restarted group resumes exactly where the last checkpoint was. (Ray's
    streaming split hands blocks to whichever worker asks first: cheaper to read, but not
    reproducible.) Only whole rounds are used, so every rank takes the same number of steps.
    """
    import numpy as np
    import torch

    def collate(batch: dict[str, Any]) -> dict[str, Any]:
        input_ids = torch.from_numpy(np.stack(batch["input_ids"]).astype(np.int64))
        # Packed pretraining data learns every token; SFT examples carry labels masked to the response.
        labels = torch.from_numpy(np.stack(batch["labels"]).astype(np.int64)) if "labels" in batch else input_ids
        return {"input_ids": input_ids, "labels": labels}

    held = None
    for index, batch in enumerate(
        shard.iter_torch_batches(batch_size=micro_batch_size, collate_fn=collate, drop_last=True)
    ):
        round_number, owner = divmod(index, world)
        if round_number < skip:
            continue
        if owner == rank:
            held = batch
        if owner == world - 1 and held is not None:  # the round is complete: every rank has its batch
            yield held
            held = None


def _on(batch: dict[str, Any], device) -> dict[str, Any]:
    # Integer token ids stay integers: DeepSpeed's bf16/fp16 engine casts the model, not its inputs.
    return {key: tensor.to(device, non_blocking=device.type == "cuda") for key, tensor in batch.items()}


def build_model(config, tokenizer_dir: str, seed: int):
    """The model to train: a fresh Llama from ``config.model``, or ``config.init_from``'s weights;
    with ``config.lora``, wrapped in peft adapters so that only they train."""
    import torch

    from pipelines.model.llama import build_llama

    if config.init_from:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)  # adapters start identical on every rank
        model = AutoModelForCausalLM.from_pretrained(config.init_from, dtype=torch.float32)
    else:
        model = build_llama(config.model, tokenizer_dir, seed)
    if config.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = config.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            ),
        )
        if config.activation_checkpointing:
            model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need a grad path
    return model


def export_model(engine, config, state_dict, tokenizer_dir: str, directory: str) -> None:
    """Rank 0 writes the Hugging Face directory; a LoRA run also writes its adapter (``adapter/``)
    and exports the base model with the adapters merged in, which vLLM loads like any model."""
    from pipelines.model.llama import export_hf

    module = engine.module
    if config.lora is not None:
        module.save_pretrained(str(Path(directory) / "adapter"))
        module = module.merge_and_unload()
        state_dict = None
    export_hf(module, module.state_dict() if state_dict is None else state_dict, tokenizer_dir, directory)


#: DeepSpeed's (private) gather of ZeRO-3's sharded parameters into one state dict (deepspeed 0.19);
#: tests/unit/test_private_hooks.py checks it still exists.
ZERO3_GATHER = "_zero3_consolidated_16bit_state_dict"


def consolidated_state_dict(engine) -> dict:
    """The full parameters of a ZeRO-3 engine (a collective: every rank calls it)."""
    gather = getattr(engine, ZERO3_GATHER, None)
    if gather is None:
        raise RuntimeError(
            f"this DeepSpeed ({type(engine).__module__}) has no {ZERO3_GATHER}: a ZeRO-3 run cannot export its model; "
            "use the pinned deepspeed==0.19.8"
        )
    return gather()


def _memory_mib(device) -> float:
    """Peak accelerator memory on GPU; the worker's resident memory on CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _mean_across_ranks(value: float, device) -> float:
    """Mean of a per-rank scalar. The tensor lives on the engine's device: NCCL (GPU runs) refuses
    CPU tensors, gloo (CPU runs) takes them."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
        tensor /= dist.get_world_size()
    return float(tensor.item())


def held_out_batches(shard, micro_batch_size: int, rank: int, world: int, max_batches: int) -> list:
    """This rank's first ``max_batches`` held-out micro-batches, read once and kept: every evaluation
    then scores the same rows, and none pays for starting a Ray Data stream again (~15 s on 2 cores)."""
    import itertools

    return list(itertools.islice(_batches(shard, micro_batch_size, 0, rank, world), max_batches))


def evaluate(engine, batches: list) -> float:
    """Mean held-out loss across ranks (every rank holds the same number of batches)."""
    import torch

    losses = []
    engine.eval()
    with torch.no_grad():
        for batch in batches:
            losses.append(float(engine(**_on(batch, engine.device)).loss))
    engine.train()
    local = sum(losses) / len(losses) if losses else float("nan")
    return _mean_across_ranks(local, engine.device)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    import deepspeed
    import ray.train
    import torch

    from pipelines.model.llama import count_parameters
    from pipelines.train.config import TrainConfig
    from pipelines.train.deepspeed_config import deepspeed_config
    from pipelines.train.metrics import PrometheusGauges, flops_per_token, mfu, peak_flops

    config = TrainConfig.model_validate(loop_config["train"])
    seed: int = loop_config["seed"]
    tokenizer_dir: str = loop_config["tokenizer_dir"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            if (Path(directory) / FINAL_EXPORT_MARKER).exists():
                return  # Training already finished; the export is the latest checkpoint.
            saved = json.loads((Path(directory) / RUN_STATE).read_text())
        if saved["world_size"] != world:
            raise RuntimeError(
                f"the checkpoint at step {saved['step']} was written by {saved['world_size']} workers; ZeRO shards "
                f"and the data position are per worker count. Resume with train.num_workers={saved['world_size']}, "
                "or start a new run_name."
            )

    model = build_model(config, tokenizer_dir, seed)
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.max_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config)
    )

    # Data position: rounds of micro-batches (one per rank) consumed in the current epoch,
    # saved with every checkpoint; the same on every rank, so rank 0's client state serves all.
    epoch, position = 0, 0
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            _, client_state = engine.load_checkpoint(directory, tag=DS_TAG)
        epoch, position = client_state["epoch"], client_state["data_position"]

    model_config = engine.module.config
    parameters = count_parameters(engine.module)
    token_flops = flops_per_token(
        parameters, model_config.num_hidden_layers, model_config.hidden_size, loop_config["seq_len"]
    )
    peak = peak_flops(engine.device)
    gauges = PrometheusGauges(context.get_experiment_name()) if rank == 0 else None

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if loop_config["has_val"] else None
    val_batches: list | None = None

    def held_out_loss() -> float:
        nonlocal val_batches
        if val_batches is None:
            val_batches = held_out_batches(val_shard, config.micro_batch_size, rank, world, config.eval_batches)
        return evaluate(engine, val_batches)

    tokens_per_step = config.effective_global_batch_size * loop_config["seq_len"]
    window_start, window_steps = time.perf_counter(), 0
    loss_sum, loss_count = 0.0, 0
    last_loss = float("nan")

    while engine.global_steps < config.max_steps:
        epoch_start_position = position
        for batch in _batches(train_shard, config.micro_batch_size, position, rank, world):
            loss = engine(**_on(batch, engine.device)).loss
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
            evaluate_now = bool(val_shard is not None and config.eval_every and step % config.eval_every == 0)
            if step % config.log_every and step % config.checkpoint_every and not last and not evaluate_now:
                continue
            elapsed = time.perf_counter() - window_start
            metrics = {
                "step": step,
                "epoch": epoch,
                "loss": _mean_across_ranks(loss_sum / loss_count, engine.device),
                "lr": scheduler.get_last_lr()[0],
                "step_time_s": elapsed / window_steps,
                "tokens_per_s": tokens_per_step * window_steps / elapsed,
                "parameters": parameters,
                "trainable_parameters": sum(p.numel() for p in trainable),
                "memory_mib": _memory_mib(engine.device),
            }
            utilisation = mfu(metrics["tokens_per_s"] / world, token_flops, peak)
            if utilisation is not None:
                metrics["mfu"] = utilisation
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                metrics["grad_norm"] = float(grad_norm)
            if evaluate_now:
                val_loss = held_out_loss()
                metrics.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)))
                window_start = time.perf_counter()  # evaluation time is not training time
            if gauges is not None:
                gauges.set(metrics)
            last_loss = metrics["loss"]
            window_start = window_start if evaluate_now else time.perf_counter()
            window_steps, loss_sum, loss_count = 0, 0.0, 0
            if step % config.checkpoint_every == 0 or last:
                with tempfile.TemporaryDirectory() as directory:
                    state = {"epoch": epoch, "data_position": position, "step": step, "world_size": world}
                    engine.save_checkpoint(directory, tag=DS_TAG, client_state=state)
                    if rank == 0:
                        (Path(directory) / RUN_STATE).write_text(json.dumps(state))
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
        val_loss = held_out_loss()
        final.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)))

    # ZeRO-3 shards parameters across ranks: gathering them is a collective every rank joins.
    state_dict = consolidated_state_dict(engine) if config.zero_stage == 3 else None
    with tempfile.TemporaryDirectory() as directory:
        export = None
        if rank == 0:
            export_model(engine, config, state_dict, tokenizer_dir, directory)
            (Path(directory) / FINAL_EXPORT_MARKER).write_text(f"pid {os.getpid()}\n")
            export = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(final, checkpoint=export)
