"""The ``train`` section of a recipe."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from pipelines.model.config import ModelConfig
from pipelines.schema import StrictModel, field_problems


class LoraConfig(StrictModel):
    """Low-rank adapters (peft) on the named linear layers; everything else stays frozen."""

    rank: int = Field(default=8, ge=1, description="Rank r of each adapter (A: r x in, B: out x r).")
    alpha: float = Field(default=16, gt=0, description="Scale: the update is (alpha / rank) * B @ A.")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="Names of the linear layers that get adapters (Llama: q/k/v/o_proj, gate/up/down_proj).",
    )


class DistillConfig(StrictModel):
    """Knowledge distillation: the trained model learns the teacher's next-token distribution as well as
    the data's tokens (loss = alpha x T^2 x KL(teacher_T || student_T) + (1 - alpha) x cross-entropy)."""

    teacher: str = Field(description="Hugging Face directory of the teacher (same tokenizer as the training data).")
    temperature: float = Field(default=2.0, gt=0, description="T: both distributions are softened by it.")
    alpha: float = Field(
        default=0.5, ge=0, le=1, description="Weight of the teacher's term; 1 - alpha weighs the data's tokens."
    )


class SftConfig(StrictModel):
    """Supervised fine-tuning on prompt/response pairs; the loss counts response tokens only."""

    path: str = Field(description="JSON-lines file (or folder of them) with one prompt/response object per line.")
    prompt_field: str = Field(default="prompt", description="Field holding the prompt.")
    response_field: str = Field(default="response", description="Field holding the response to learn.")
    seq_len: int = Field(default=256, ge=8, description="Tokens per example; longer examples are cut at the end.")
    val_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Share of pairs (chosen by a hash of the prompt) held out for evaluation."
    )
    use_chat_template: bool = Field(
        default=True,
        description="Wrap the prompt in the tokenizer's chat template (as /v1/chat/completions will), if it has one.",
    )


def _worker_count(value: Any) -> Any:
    """One clear message for a worker count, instead of one per member of the union."""
    if isinstance(value, bool):
        raise ValueError(f"a number of workers or [min, max] (got {value!r})")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"at least 1 worker (got {value})")
        return value
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ValueError(f"an elastic range is two whole numbers, [min, max] (got {list(value)!r})")
        low, high = value
        if not 1 <= low <= high:
            raise ValueError(f"an elastic range [min, max] needs 1 <= min <= max (got {list(value)!r})")
        return (low, high)
    raise ValueError(f"a number of workers or [min, max] (got {value!r})")


#: A worker count: a number, or an elastic [min, max] (a tuple once validated, as Ray's ScalingConfig takes it).
Workers = Annotated[int | tuple[int, int], BeforeValidator(_worker_count)]


class TrainConfig(StrictModel):
    num_workers: Workers = Field(
        default=2,
        description="Ray Train workers (one DeepSpeed rank each): a number, or [min, max] for elastic training. "
        "Elastic: the group starts with as many workers as the cluster has room for (at least min), goes on with "
        "the survivors when a worker or node is lost, and grows back when room returns (see resize_check_s); "
        "each resize restarts the group from its last checkpoint, ZeRO's state re-sharded for the new count "
        "(DeepSpeed's universal checkpoint). The global batch stays the same: gradient accumulation adapts.",
    )
    resize_check_s: float = Field(
        default=60,
        gt=0,
        description="Elastic runs: how often Ray Train looks for room to grow the worker group towards its max "
        "(Ray's elastic_resize_monitor_interval_s).",
    )
    elastic_start_wait_s: float = Field(
        default=5,
        gt=0,
        description="Elastic runs: how long a worker group start waits to be placed before Ray Train counts the "
        "nodes again and starts the group that fits. A lost node stays listed alive until Ray's health checks "
        "fail (about 15 s by default); a start sized for it waits this long, not Ray's 60 s.",
    )
    use_gpu: bool = Field(default=False, description="Give each worker a GPU (NCCL) instead of CPU (gloo).")
    cpus_per_worker: float = Field(default=1, gt=0, description="Logical CPUs reserved per worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="How Ray places the workers on nodes (its placement group strategy): PACK fills a node first; "
        "SPREAD and STRICT_SPREAD put them on different nodes (STRICT_SPREAD waits until there are enough nodes).",
    )
    model: ModelConfig = Field(
        default_factory=ModelConfig, description="Architecture of the model trained from scratch."
    )
    init_from: str | None = Field(
        default=None,
        description="Local Hugging Face model directory to continue from (weights and tokenizer). "
        "Unset: a randomly initialised model built from `model`.",
    )
    lora: LoraConfig | None = Field(default=None, description="Train LoRA adapters only (needs init_from).")
    distill: DistillConfig | None = Field(
        default=None,
        description="Learn from a teacher model's logits besides the data (the compress stage's students).",
    )
    sft: SftConfig | None = Field(
        default=None, description="Fine-tune on prompt/response pairs instead of the data stage's packed shards."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(default=2, description="DeepSpeed ZeRO stage.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="Training precision. fp16 uses dynamic loss scaling."
    )
    micro_batch_size: int = Field(default=4, ge=1, description="Sequences per worker per forward pass.")
    gradient_accumulation_steps: int = Field(
        default=1,
        ge=1,
        description="Micro-batches per worker per optimizer step (elastic runs: at the max worker count; with fewer "
        "workers each accumulates more, so that the global batch stays the same).",
    )
    global_batch_size: int | None = Field(
        default=None,
        ge=1,
        description="Sequences per optimizer step across all workers. Unset: micro_batch_size x "
        "gradient_accumulation_steps x num_workers (its max when elastic); set: it must equal that product.",
    )
    offload_optimizer: bool = Field(
        default=False, description="Keep optimizer state in CPU memory (ZeRO-Offload; zero_stage >= 1)."
    )
    offload_params: bool = Field(
        default=False, description="Keep parameters in CPU memory (ZeRO-Infinity; zero_stage 3)."
    )
    activation_checkpointing: bool = Field(
        default=False, description="Recompute activations in the backward pass to save memory."
    )
    lr: float = Field(default=3e-3, gt=0, le=1, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(default=5, ge=0, description="Linear warmup steps before cosine decay.")
    max_steps: int = Field(default=40, ge=1, description="Optimizer steps to train.")
    grad_clip: float = Field(default=1.0, ge=0, description="Gradient norm clipping (0: off).")
    checkpoint_every: int = Field(default=20, ge=1, description="Save a checkpoint every this many steps.")
    num_checkpoints_to_keep: int = Field(default=2, ge=1, description="Checkpoints Ray Train keeps.")
    max_failures: int = Field(default=2, ge=0, description="Worker-group restarts allowed (from the last checkpoint).")
    wait_for_nodes_s: float | None = Field(
        default=None,
        gt=0,
        description="How long the workers wait for room on the cluster, at the start and after a lost node, before "
        "the stage stops and says why (its checkpoints kept: run it again once the nodes are back). Unset: Ray "
        "Train's default, waiting without end (one start attempt a minute).",
    )
    sample_ledger: bool = Field(
        default=False,
        description="Record which packed rows each optimizer step trained on (each micro-batch's epoch, index and a "
        "hash of its tokens; one line per micro-batch in ray.ledger.jsonl next to the checkpoints): an audit that "
        "no row was skipped or repeated across restarts and resizes.",
    )
    log_every: int = Field(default=5, ge=1, description="Report metrics every this many steps.")
    eval_every: int = Field(
        default=0, ge=0, description="Held-out loss and perplexity every this many steps (0: only at the end)."
    )
    eval_batches: int = Field(
        default=20,
        ge=1,
        description="Held-out micro-batches per worker in each evaluation (at the max worker count: the same "
        "eval_batches x max workers micro-batches are shared among however many workers run).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        """Every impossible DeepSpeed combination, named by its keys, before any worker starts."""
        problems = []
        if self.precision == "bf16" and not self.use_gpu and self.zero_stage == 0:
            # DeepSpeed's bf16 path without ZeRO needs a GPU optimizer wrapper.
            problems.append(("precision", "'bf16' on CPU needs zero_stage >= 1"))
        if self.precision == "fp16" and not self.use_gpu:
            problems.append(("precision", "'fp16' needs use_gpu: true (CPU has no fp16 kernels for training)"))
        product = self.micro_batch_size * self.gradient_accumulation_steps * self.max_workers
        if self.global_batch_size is not None and self.global_batch_size != product:
            problems.append(
                (
                    "global_batch_size",
                    f"{self.global_batch_size} must equal micro_batch_size ({self.micro_batch_size}) "
                    f"x gradient_accumulation_steps ({self.gradient_accumulation_steps}) x num_workers "
                    f"({self.max_workers}{' at most' if self.elastic else ''}) = {product}",
                )
            )
        uneven = [w for w in self.worker_counts if product % (self.micro_batch_size * w)]
        if uneven:
            counts = math.lcm(*self.worker_counts)
            problems.append(
                (
                    "num_workers",
                    f"the global batch of {product} sequences is not a whole number of micro-batches "
                    f"({self.micro_batch_size} sequences) per worker with {', '.join(map(str, uneven))} workers "
                    f"(the global batch stays fixed as workers come and go); the smallest that fits every count "
                    f"in {list(self.num_workers)} is gradient_accumulation_steps="
                    f"{counts // math.gcd(counts, self.max_workers)}",
                )
            )
        if self.elastic and self.wait_for_nodes_s is not None:
            # Ray Train's elastic policy waits for min workers without a bound; its start timeout does not apply.
            problems.append(("wait_for_nodes_s", "has no effect with an elastic num_workers: leave it unset"))
        if self.offload_optimizer and self.zero_stage == 0:
            problems.append(("offload_optimizer", "needs zero_stage >= 1 (ZeRO partitions what it offloads)"))
        if self.offload_params and self.zero_stage != 3:
            problems.append(("offload_params", f"needs zero_stage 3 (got {self.zero_stage})"))
        if self.lora is not None and self.init_from is None:
            problems.append(("lora", "adapters fine-tune an existing model: set init_from"))
        if self.lora is not None and self.zero_stage == 3:
            problems.append(("lora", "LoRA with ZeRO-3 is not supported here (adapters are merged on one rank)"))
        if self.sft is not None and self.init_from is None:
            problems.append(("sft", "fine-tuning needs a model and its tokenizer: set init_from"))
        if problems:
            raise field_problems(problems)
        return self

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def worker_counts(self) -> range:
        return range(self.min_workers, self.max_workers + 1)

    @property
    def effective_global_batch_size(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * self.max_workers

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches in one optimizer step across all workers (the same at every worker count)."""
        return self.effective_global_batch_size // self.micro_batch_size

    def accumulation_at(self, world: int) -> int:
        """Micro-batches each of ``world`` workers accumulates per optimizer step: the global batch is fixed."""
        if world not in self.worker_counts:
            raise ValueError(f"{world} workers is outside train.num_workers={self.num_workers}")
        return self.effective_global_batch_size // (self.micro_batch_size * world)

    def _derive(self, **changes: Any) -> TrainConfig:
        """A validated copy with ``changes`` (top-level fields; sections as models or mappings)."""
        values = self.model_dump()
        for key, value in changes.items():
            if key not in values:
                raise KeyError(f"train has no field {key!r}")
            values[key] = value.model_dump() if isinstance(value, StrictModel) else value
        return TrainConfig.model_validate(values)

    def with_params(self, params: dict[str, Any]) -> TrainConfig:
        """This config with each dotted ``train.*`` key of ``params`` set (a sweep's trial or its winner)."""
        values = self.model_dump()
        for key, value in params.items():
            *parents, leaf = key.split(".")[1:]
            node = values
            for part in parents:
                if not isinstance(node.get(part), dict):
                    raise KeyError(f"train has no section {part!r}")
                node = node[part]
            if leaf not in node:
                raise KeyError(f"train has no field {leaf!r}")
            node[leaf] = value
        return TrainConfig.model_validate(values)

    def shortened(
        self, steps: int, report_every: int | None = None, checkpoint_every: int | None = None
    ) -> TrainConfig:
        """The same run cut to ``steps`` optimizer steps: warm-up within the first quarter, reports (with an
        evaluation) every ``report_every`` steps (default: once, at the end), checkpoints every
        ``checkpoint_every`` (default: at the end only)."""
        every = report_every or steps
        return self._derive(
            max_steps=steps,
            warmup_steps=min(self.warmup_steps, steps // 4),
            checkpoint_every=min(checkpoint_every or steps, steps),
            log_every=every,
            eval_every=every,
        )

    def for_trial(self, params: dict[str, Any], steps: int, workers: int | tuple[int, int]) -> TrainConfig:
        """A sweep trial: the trial's values, ``steps`` long on ``workers`` workers (a number or an elastic
        [min, max]), keeping this config's global batch (accumulation absorbs another worker count or
        micro-batch), evaluated at every report so the objective is in every result Tune sees."""
        trial = self.with_params(params)
        most = workers[1] if isinstance(workers, tuple) else workers
        per_pass = trial.micro_batch_size * most
        if self.effective_global_batch_size % per_pass:
            raise ValueError(
                f"the global batch of {self.effective_global_batch_size} sequences is not a whole number of "
                f"micro_batch_size ({trial.micro_batch_size}) x tune.workers_per_trial ({most})"
            )
        return trial._derive(
            num_workers=workers,
            gradient_accumulation_steps=self.effective_global_batch_size // per_pass,
            global_batch_size=None,
            # An elastic trial waits for its min workers as Ray Train does; the recipe's bound is for fixed counts.
            wait_for_nodes_s=None if isinstance(workers, tuple) else trial.wait_for_nodes_s,
        ).shortened(
            steps,
            report_every=max(1, min(self.log_every, steps)),
            # An elastic trial resizes from its last checkpoint: at the recipe's cadence, not only at the end.
            checkpoint_every=self.checkpoint_every if isinstance(workers, tuple) else None,
        )

    def for_student(
        self,
        distill: DistillConfig,
        steps: int,
        lr: float | None = None,
        shape: dict[str, int] | None = None,
        init_from: str | None = None,
    ) -> TrainConfig:
        """A model trained against ``distill.teacher``'s logits with this config's workers, batch and fault tolerance: a
        fresh student of ``shape``, or ``init_from``'s weights (a pruned model's recovery)."""
        return (
            self._derive(
                model=self.model.model_copy(update=shape or {}),
                init_from=init_from,
                lora=None,
                sft=None,
                distill=distill,
                lr=lr or self.lr,
            )
            .shortened(steps, report_every=steps)
            ._derive(checkpoint_every=max(1, steps // 2))
        )
