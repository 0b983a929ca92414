"""What each Ray Train worker runs: one DeepSpeed rank over its shard of the packed data.

The loop config crosses the process boundary as a plain dict and is validated
again here; nothing is read from module globals of the driver.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.train.ledger import SampleLedger
from pipelines.train.reshard import needs_universal, to_universal

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


def _batches(shard, micro_batch_size: int, skip: int, rank: int = 0, world: int = 1, limit: int | None = None):
    """This rank's micro-batches of ``input_ids`` after the first ``skip`` micro-batches of the epoch (the data
    position) and before the ``limit``-th, each with its index in the epoch.

    Every worker streams the whole dataset in the same order and, from the position on, takes every
    ``world``-th micro-batch: which rows the group trains on, and in which step, is then fixed by the
    data and the position alone, whatever the worker count, so a restarted or resized group resumes
    exactly where the last checkpoint was. (Ray's streaming split hands blocks to whichever worker asks
    first: cheaper to read, but not reproducible.) Only whole rounds (one micro-batch per rank) are used,
    so every rank takes the same number of steps; with ``limit`` a multiple of every worker count (whole
    optimizer steps, see ``RankRun.per_epoch``), the epoch ends at the same row whatever the count.
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
        if limit is not None and index >= limit:
            break
        if index < skip:
            continue
        owner = (index - skip) % world
        if owner == rank:
            held = (index, batch)
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


def _sum_across_ranks(values: list[float], device) -> list[float]:
    """Element-wise sums of per-rank scalars. The tensor lives on the engine's device: NCCL (GPU runs) refuses
    CPU tensors, gloo (CPU runs) takes them."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return [float(value) for value in tensor.tolist()]


def _mean_across_ranks(value: float, device) -> float:
    """Mean of a per-rank scalar."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return _sum_across_ranks([value], device)[0] / world


def held_out_batches(shard, micro_batch_size: int, rank: int, world: int, total: int) -> list[tuple[Any, bool]]:
    """This rank's share of the first ``total`` held-out micro-batches (every ``world``-th), read once and kept:
    every evaluation then scores the same rows, whatever the worker count, and none pays for starting a Ray
    Data stream again (~15 s on 2 cores). Each comes with whether it counts: a rank with fewer than the others
    repeats its first batch uncounted, so that every rank runs the same forward passes (ZeRO-3 gathers the
    parameters in each, a collective)."""
    read = list(_batches(shard, micro_batch_size, 0, limit=total))
    mine = [(batch, True) for index, batch in read if index % world == rank]
    passes = -(-len(read) // world)  # ceil: the most any rank holds
    if read and len(mine) < passes:
        padding = mine[0][0] if mine else read[0][1]
        mine += [(padding, False)] * (passes - len(mine))
    return mine


def evaluate(engine, batches: list[tuple[Any, bool]]) -> float:
    """Mean held-out loss over every rank's counted batches (ranks may count different numbers of them)."""
    import torch

    total, counted = 0.0, 0
    engine.eval()
    with torch.no_grad():
        for batch, counts in batches:
            loss = float(engine(**_on(batch, engine.device)).loss)
            if counts:
                total, counted = total + loss, counted + 1
    engine.train()
    summed, count = _sum_across_ranks([total, float(counted)], engine.device)
    return summed / count if count else float("nan")


def restore_point(checkpoint, config, world: int) -> dict[str, Any] | None:
    """What the latest checkpoint says about the run: None to start fresh, ``{"finished": True}`` when
    the final export is the latest checkpoint, else the saved state. Any worker count may load it (ZeRO's
    state is re-sharded, the data position is per micro-batch); another batch shape is refused, since
    the position and the optimizer's steps would mean other rows."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        if (Path(directory) / FINAL_EXPORT_MARKER).exists():
            return {"finished": True}
        saved = json.loads((Path(directory) / RUN_STATE).read_text())
    if "global_batch_size" not in saved:  # written before positions counted micro-batches: it counted rounds
        if saved["world_size"] != world:  # its batch shape is not recorded: only the same group can tell
            raise RuntimeError(
                f"the checkpoint at step {saved['step']} was written by {saved['world_size']} workers before Loom "
                f"recorded batch shapes; resume it with train.num_workers={saved['world_size']} once (its next "
                "checkpoint can then resume at any count), or start a new run_name."
            )
        saved.update(
            data_position=saved["data_position"] * saved["world_size"],
            global_batch_size=config.effective_global_batch_size,
            micro_batch_size=config.micro_batch_size,
        )
    now = {"micro_batch_size": config.micro_batch_size, "global_batch_size": config.effective_global_batch_size}
    changed = {key: (saved[key], value) for key, value in now.items() if saved[key] != value}
    if changed:
        raise RuntimeError(
            f"the checkpoint at step {saved['step']} was written with "
            + ", ".join(f"train.{key}={was} (now {value})" for key, (was, value) in changed.items())
            + ": its data position and optimizer steps count other batches. Resume with the same batch shape "
            "(the worker count may change), or start a new run_name."
        )
    return saved


def build_engine(config, tokenizer_dir: str, seed: int, world: int, load_universal: bool = False):
    """The DeepSpeed engine of one of ``world`` ranks (model, AdamW, warmup + cosine schedule) and the trainable
    parameters; ``load_universal``: it will load ZeRO state written by another worker count."""
    import deepspeed
    import torch

    from pipelines.train.deepspeed_config import deepspeed_config

    model = build_model(config, tokenizer_dir, seed)
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, config.max_steps))
    with _torch_compile_off():
        engine, _, _, scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(config, world, load_universal),
        )
    return engine, scheduler, trainable


@contextlib.contextmanager
def _torch_compile_off():
    """torch.compile decorators applied inside the block leave their functions as they are.

    deepspeed.initialize checks the optimizer against ZeRO's list by importing DeepSpeed's Muon optimizer, whose
    @torch.compile decorators import torch's inductor compiler: about 1.5 s of every engine (re)build on these CPUs
    (most of initialize), for an optimizer Loom does not use; Loom compiles nothing in training. torch reads
    TORCHDYNAMO_DISABLE when a decorator is applied, so the variable is set for this call only; what is decorated
    meanwhile (modules first imported by initialize) stays uncompiled for the process's life."""
    # One variable put back by hand: mock.patch.dict would restore the whole environment, undoing what
    # deepspeed.initialize sets in it (its distributed variables).
    before = os.environ.get("TORCHDYNAMO_DISABLE")
    os.environ["TORCHDYNAMO_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["TORCHDYNAMO_DISABLE"]
        else:
            os.environ["TORCHDYNAMO_DISABLE"] = before


def _lean_transformers() -> None:
    """transformers imports optional packages as its modules load, for features training a causal LM never calls:
    scikit-learn (with SciPy) for assisted decoding's ``roc_curve``, SciPy's optimizer for object detection's losses.
    A training worker is a fresh process on every start and restart, and these imports are a large share of its time
    before the first step (docs/src/benchmarks.md, recovery). transformers reads their availability when those
    modules load, so this runs before any model is built; those features would then report the packages missing in
    this process."""
    import transformers.utils

    transformers.utils.is_sklearn_available = lambda: False
    transformers.utils.is_scipy_available = lambda: False


class RankRun:
    """One rank's training run, in the order it happens: restore, step through micro-batches, report
    (and checkpoint) at the configured steps, export at the end.

    The data position counts the micro-batches of the current epoch the group has trained on, whatever
    its worker count; it is saved with every checkpoint and is the same on every rank, so rank 0's
    client state serves all. A checkpoint written by another worker count (an elastic resize) is
    re-sharded through DeepSpeed's universal checkpoint, and gradient accumulation makes up the same
    global batch.
    """

    def __init__(self, loop_config: dict[str, Any]):
        import ray.train

        from pipelines.model.llama import count_parameters
        from pipelines.train.config import TrainConfig
        from pipelines.train.metrics import PrometheusGauges, flops_per_token, peak_flops

        #: Wall-clock time this group start entered the training function (a restart's breakdown starts here).
        self.started_at = time.time()
        self.config = config = TrainConfig.model_validate(loop_config["train"])
        self.tokenizer_dir: str = loop_config["tokenizer_dir"]
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.checkpoint = ray.train.get_checkpoint()
        self.saved = restore_point(self.checkpoint, config, self.world)
        if self.finished_before:
            return
        #: Seconds of this group start's restore, by phase (reported with its first step).
        self.restart_s: dict[str, float] = {}
        started = time.perf_counter()
        self.resharding = self.saved is not None and needs_universal(
            config.zero_stage, self.saved["world_size"], self.world
        )
        self.engine, self.scheduler, self.trainable = build_engine(
            config, self.tokenizer_dir, loop_config["seed"], self.world, self.resharding
        )
        self.restart_s["engine"] = time.perf_counter() - started
        self.epoch, self.position = 0, 0
        #: Held-out loss of the model before its first step: the "before" of the run's before/after.
        self.initial_val_loss: float | None = None
        if self.checkpoint is not None:
            self.restore(context)
        else:
            self.restart_s = {}  # a first start: nothing restored
        self.ledger = SampleLedger(loop_config.get("ledger"), self.rank, self.world)

        module = self.engine.module
        self.parameters = count_parameters(module)
        self.token_flops = flops_per_token(
            self.parameters, module.config.num_hidden_layers, module.config.hidden_size, loop_config["seq_len"]
        )
        self.peak = peak_flops(self.engine.device)
        self.gauges = (
            PrometheusGauges(context.get_experiment_name(), resumed=self.checkpoint is not None)
            if self.rank == 0
            else None
        )
        per_step = config.micro_batches_per_step
        #: Micro-batches trained per epoch: whole optimizer steps of the training rows.
        self.per_epoch = loop_config["train_rows"] // config.micro_batch_size // per_step * per_step
        if self.per_epoch == 0:
            raise ValueError(
                f"the training data holds {loop_config['train_rows']} sequences, fewer than one global batch "
                f"({config.effective_global_batch_size}); add data or lower train.micro_batch_size or "
                "train.gradient_accumulation_steps"
            )
        self.train_shard = ray.train.get_dataset_shard("train")
        self.val_shard = ray.train.get_dataset_shard("val") if loop_config["has_val"] else None
        self.val_batches: list | None = None
        self.tokens_per_step = config.effective_global_batch_size * loop_config["seq_len"]
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.loss_sum, self.loss_count = 0.0, 0
        #: Seconds of this window spent waiting for the next micro-batch, and the last report's (with its checkpoint).
        self.data_wait, self.last_report_s = 0.0, 0.0
        self.last_loss = float("nan")
        if self.val_shard is not None and self.checkpoint is None:
            self.initial_val_loss = self.held_out_loss()
        self.teacher = None
        if config.distill is not None:
            from pipelines.compress.distill import load_teacher

            self.teacher = load_teacher(config.distill.teacher, self.engine.device)
        self.ready_at = time.perf_counter()  # the first micro-batch's wait is the data stream's start

    @property
    def finished_before(self) -> bool:
        return bool(self.saved and self.saved.get("finished"))

    def restore(self, context) -> None:
        """The engine, optimizer, schedule and data position of the last checkpoint; ZeRO state written by another
        worker count is first converted to a universal checkpoint, once per node, in node-local scratch space."""
        import torch.distributed as dist

        with self.checkpoint.as_directory() as directory:
            source, scratch = Path(directory), None
            if self.resharding:
                started = time.perf_counter()
                name = re.sub(r"[^A-Za-z0-9_.-]", "_", context.get_experiment_name())
                scratch = Path(tempfile.gettempdir()) / f"loom-universal-{name}-node{context.get_node_rank()}"
                if context.get_local_rank() == 0:
                    to_universal(source, DS_TAG, scratch)
                dist.barrier()
                source = scratch
                self.restart_s["reshard"] = time.perf_counter() - started
            started = time.perf_counter()
            _, client_state = self.engine.load_checkpoint(str(source), tag=DS_TAG)
            self.restart_s["load"] = time.perf_counter() - started
        if scratch is not None:
            dist.barrier()  # every rank of the node has read it
            if context.get_local_rank() == 0:
                shutil.rmtree(scratch, ignore_errors=True)
        self.epoch, self.initial_val_loss = client_state["epoch"], client_state.get("initial_val_loss")
        self.position = self.saved["data_position"]  # in micro-batches (restore_point converts older checkpoints)
        if self.rank == 0 and self.saved["world_size"] != self.world:
            print(
                f"loom: resized from {self.saved['world_size']} to {self.world} workers at step {self.saved['step']}: "
                + (
                    f"ZeRO state re-sharded in {self.restart_s['reshard']:.1f} s, "
                    if "reshard" in self.restart_s
                    else "ZeRO-0 state loaded as saved, "
                )
                + f"{self.config.accumulation_at(self.world)} micro-batches per worker per step",
                flush=True,
            )

    def micro_batches(self):
        """This rank's micro-batches from the data position on, epoch after epoch, each with its index in the
        epoch. An epoch is a whole number of optimizer steps (the rows past the last whole global batch wait
        for the next epoch's order), so it ends at the same row whatever the worker count."""
        while True:
            start = self.position
            yield from _batches(
                self.train_shard, self.config.micro_batch_size, self.position, self.rank, self.world, self.per_epoch
            )
            if self.position == start == 0:
                raise RuntimeError(f"rank {self.rank}: the training data stream ended before its first micro-batch")
            self.epoch, self.position = self.epoch + 1, 0

    def step(self, index: int, batch: dict[str, Any]) -> bool:
        """Forward, backward and DeepSpeed's step on one micro-batch (``index`` in the epoch); True when the
        optimizer stepped (False inside a gradient accumulation window)."""
        if self.restart_s and "first_batch" not in self.restart_s:
            self.restart_s["first_batch"] = time.perf_counter() - self.ready_at
        self.ledger.record(self.engine.global_steps + 1, self.epoch, index, batch)
        batch = _on(batch, self.engine.device)
        output = self.engine(**batch)
        loss = output.loss if self.teacher is None else self.distilled(output, batch)
        self.engine.backward(loss)
        steps_before = self.engine.global_steps
        self.engine.step()
        self.position += self.world  # every rank took one micro-batch of this round
        self.loss_sum, self.loss_count = self.loss_sum + float(loss), self.loss_count + 1
        if self.engine.global_steps == steps_before:
            return False
        self.window_steps += 1
        return True

    def distilled(self, output, batch: dict[str, Any]):
        """The step's loss against the teacher's logits for the same tokens (``train.distill``)."""
        import torch

        from pipelines.compress.distill import distillation_loss

        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=batch["input_ids"]).logits
        distill = self.config.distill
        return distillation_loss(
            output.logits, teacher_logits, batch["labels"], output.loss, distill.temperature, distill.alpha
        )

    def held_out_loss(self) -> float:
        if self.val_batches is None:
            total = self.config.eval_batches * self.config.max_workers  # the same rows at any worker count
            self.val_batches = held_out_batches(
                self.val_shard, self.config.micro_batch_size, self.rank, self.world, total
            )
        return evaluate(self.engine, self.val_batches)

    @property
    def done(self) -> bool:
        return self.engine.global_steps >= self.config.max_steps

    def report_due(self) -> tuple[bool, bool]:
        """(report now, evaluate now) after the optimizer step just taken."""
        config, step = self.config, self.engine.global_steps
        evaluate_now = bool(self.val_shard is not None and config.eval_every and step % config.eval_every == 0)
        due = step % config.log_every == 0 or step % config.checkpoint_every == 0 or self.done or evaluate_now
        return due, evaluate_now

    def metrics(self, evaluate_now: bool) -> dict[str, Any]:
        """The report of this step: losses, speed and memory over the window since the last report."""
        from pipelines.train.metrics import mfu

        engine = self.engine
        elapsed = time.perf_counter() - self.window_start
        metrics = {
            "step": engine.global_steps,
            "epoch": self.epoch,
            "loss": _mean_across_ranks(self.loss_sum / self.loss_count, engine.device),
            "lr": self.scheduler.get_last_lr()[0],
            "step_time_s": elapsed / self.window_steps,
            # Where a step's time goes besides compute: waiting for data, and reporting (the last report's seconds).
            "data_wait_s": self.data_wait / self.window_steps,
            "last_report_s": self.last_report_s,
            "tokens_per_s": self.tokens_per_step * self.window_steps / elapsed,
            "parameters": self.parameters,
            "trainable_parameters": sum(p.numel() for p in self.trainable),
            "world_size": self.world,
            "grad_accum": self.engine.gradient_accumulation_steps(),
            "memory_mib": _memory_mib(engine.device),
        }
        utilisation = mfu(metrics["tokens_per_s"] / self.world, self.token_flops, self.peak)
        if utilisation is not None:
            metrics["mfu"] = utilisation
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        if evaluate_now:
            val_loss = self.held_out_loss()
            metrics.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)))
        if self.restart_s:  # the first report of a restored group: what its restore cost
            metrics.update({f"restart_{phase}_s": seconds for phase, seconds in self.restart_s.items()})
            metrics["restart_started_at"] = self.started_at
            self.restart_s = {}
        return metrics

    def report(self, evaluate_now: bool) -> None:
        """Report this step to Ray Train, with a checkpoint when one is due; start a new window."""
        import ray.train

        metrics = self.metrics(evaluate_now)
        if self.gauges is not None:
            self.gauges.set(metrics)
        self.last_loss = metrics["loss"]
        # Evaluation is not training time; the report itself (and a checkpoint) is, in the next window.
        self.window_start = time.perf_counter()
        self.window_steps, self.loss_sum, self.loss_count, self.data_wait = 0, 0.0, 0, 0.0
        if self.engine.global_steps % self.config.checkpoint_every == 0 or self.done:
            self.checkpoint_and_report(metrics)
        else:
            ray.train.report(metrics)
        self.last_report_s = time.perf_counter() - self.window_start

    def checkpoint_and_report(self, metrics: dict[str, Any]) -> None:
        import ray.train

        step = self.engine.global_steps
        with tempfile.TemporaryDirectory() as directory:
            # A checkpoint on an epoch's last step resumes at the next epoch's start, not by streaming this one.
            epoch, position = (self.epoch + 1, 0) if self.position >= self.per_epoch else (self.epoch, self.position)
            state = {
                "epoch": epoch,
                "data_position": position,
                "step": step,
                "world_size": self.world,
                "micro_batch_size": self.config.micro_batch_size,
                "global_batch_size": self.config.effective_global_batch_size,
                "initial_val_loss": self.initial_val_loss,
            }
            self.ledger.flush()  # before the checkpoint: a restart from it supersedes the lines of later steps
            self.engine.save_checkpoint(directory, tag=DS_TAG, client_state=state)
            if self.rank == 0:
                (Path(directory) / RUN_STATE).write_text(json.dumps(state))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def export(self) -> None:
        """The final report (held-out loss) with rank 0's Hugging Face export as its checkpoint."""
        import ray.train

        # "loss" repeats the last training loss so that every report carries it (Tune's searchers require that).
        final: dict[str, Any] = {"step": self.engine.global_steps, "final": True, "loss": self.last_loss}
        if self.val_shard is not None:
            val_loss = self.held_out_loss()
            final.update(val_loss=val_loss, val_perplexity=math.exp(min(val_loss, 50.0)))
        if self.initial_val_loss is not None:
            final.update(
                initial_val_loss=self.initial_val_loss,
                initial_val_perplexity=math.exp(min(self.initial_val_loss, 50.0)),
            )
        # ZeRO-3 shards parameters across ranks: gathering them is a collective every rank joins.
        state_dict = consolidated_state_dict(self.engine) if self.config.zero_stage == 3 else None
        with tempfile.TemporaryDirectory() as directory:
            export = None
            if self.rank == 0:
                export_model(self.engine, self.config, state_dict, self.tokenizer_dir, directory)
                (Path(directory) / FINAL_EXPORT_MARKER).write_text(f"pid {os.getpid()}\n")
                export = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(final, checkpoint=export)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """restore -> step through the micro-batches, reporting at the configured steps -> export."""
    _lean_transformers()
    run = RankRun(loop_config)
    if run.finished_before:
        return  # training already finished; the export is the latest checkpoint
    if not run.done:
        asked = time.perf_counter()
        for index, batch in run.micro_batches():
            run.data_wait += time.perf_counter() - asked
            if not run.step(index, batch):
                asked = time.perf_counter()
                continue  # inside a gradient accumulation window
            due, evaluate_now = run.report_due()
            if due:
                run.report(evaluate_now)
            if run.done:
                break
            asked = time.perf_counter()
    run.export()
