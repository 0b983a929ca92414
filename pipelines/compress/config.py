"""The ``compress`` section of a recipe: which compressions the sweep may try, how far, and the bound on
quality a variant must keep to be on the front."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from pipelines.schema import StrictModel, field_problems

Family = Literal["bnb_int8", "bnb_nf4", "w8a8", "prune", "distill"]

#: What each family makes, for people reading a recipe or a variant's record.
FAMILIES: dict[str, str] = {
    "bnb_int8": "bitsandbytes LLM.int8() weights (transformers; vLLM serves it on GPU only)",
    "bnb_nf4": "bitsandbytes 4-bit NormalFloat weights (transformers; vLLM serves it on GPU only)",
    "w8a8": "int8 weights per channel and int8 activations per token, compressed-tensors format (vLLM CPU and GPU)",
    "prune": "attention head groups and MLP channels removed by importance, the same in every layer (a dense Llama)",
    "distill": "a smaller Llama (fewer layers, narrower) trained on Ray Train + DeepSpeed against the model's logits",
}
#: The knobs each family takes in the sweep (and in a try_first point).
FAMILY_KNOBS: dict[str, tuple[str, ...]] = {
    "prune": ("heads_kept", "mlp_kept", "then_quantize"),
    "distill": ("layers_kept", "width_kept"),
}


class FractionRange(StrictModel):
    """A fraction the sweep draws uniformly from [low, high]."""

    low: float = Field(gt=0, le=1, description="Smallest fraction kept.")
    high: float = Field(gt=0, le=1, description="Largest fraction kept.")

    @model_validator(mode="after")
    def _ordered(self) -> FractionRange:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class PruneSpace(StrictModel):
    heads_kept: FractionRange = Field(
        default_factory=lambda: FractionRange(low=0.5, high=1.0),
        description="Fraction of key-value head groups each layer keeps (rounded to a count whose heads divide "
        "hidden_size, which transformers requires).",
    )
    mlp_kept: FractionRange = Field(
        default_factory=lambda: FractionRange(low=0.25, high=1.0),
        description="Fraction of MLP channels each layer keeps (rounded to a multiple of 16).",
    )
    then_quantize: list[Literal["none", "w8a8"]] = Field(
        default_factory=lambda: ["none", "w8a8"],
        description="What may follow pruning: nothing, or w8a8 quantization of the pruned model.",
    )
    recovery_steps: int = Field(
        default=0,
        ge=0,
        description="Optimizer steps of a recovery fine-tune of every pruned model, from its pruned weights "
        "against the unpruned model's logits (Ray Train + DeepSpeed, with distill's temperature, alpha and lr), "
        "before any quantization. 0: none.",
    )


class DistillSpace(StrictModel):
    layers_kept: FractionRange = Field(
        default_factory=lambda: FractionRange(low=0.5, high=0.5),
        description="Fraction of the model's layers the student has (at least one).",
    )
    width_kept: FractionRange = Field(
        default_factory=lambda: FractionRange(low=0.5, high=1.0),
        description="Fraction of the model's heads the student has (its head size kept; the MLP scaled alike).",
    )
    steps: int = Field(default=100, ge=1, description="Optimizer steps each student trains (train's batch size).")
    lr: float | None = Field(default=None, gt=0, le=1, description="Peak learning rate. Unset: the train stage's.")
    temperature: float = Field(default=2.0, gt=0, description="Softening of both distributions in the KL term.")
    alpha: float = Field(default=0.5, ge=0, le=1, description="Weight of the teacher's term against the data's tokens.")


class SpeedLoad(StrictModel):
    """The fixed load every candidate's speed is measured under: one request at a time, greedy."""

    requests: int = Field(default=8, ge=1, description="Requests timed, one after another.")
    prompt_tokens: int = Field(default=16, ge=1, description="Prompt length of each request, in tokens.")
    new_tokens: int = Field(default=32, ge=1, description="Tokens each request generates (end of sequence ignored).")


class DraftProbe(StrictModel):
    """The best distilled student (lowest perplexity) measured as the model's speculative-decoding draft in
    vLLM (its draft-model method), and kept under variants/ whether or not it is on the front."""

    enabled: bool = Field(default=True, description="Measure the student as a draft when the sweep trained one.")
    num_speculative_tokens: int = Field(
        default=3, ge=1, le=16, description="Tokens the draft proposes per step, for the target to check at once."
    )


class CandidatePoint(StrictModel):
    """A candidate the sweep measures before Optuna proposes its own (e.g. one known to be good)."""

    family: Family = Field(description="The compression family.")
    heads_kept: float | None = Field(default=None, gt=0, le=1, description="prune: fraction of head groups kept.")
    mlp_kept: float | None = Field(default=None, gt=0, le=1, description="prune: fraction of MLP channels kept.")
    then_quantize: Literal["none", "w8a8"] | None = Field(default=None, description="prune: what follows pruning.")
    layers_kept: float | None = Field(default=None, gt=0, le=1, description="distill: fraction of layers kept.")
    width_kept: float | None = Field(default=None, gt=0, le=1, description="distill: fraction of heads kept.")

    @model_validator(mode="after")
    def _knobs_fit_the_family(self) -> CandidatePoint:
        wanted = FAMILY_KNOBS.get(self.family, ())
        missing = [knob for knob in wanted if getattr(self, knob) is None]
        if missing:
            raise ValueError(f"{self.family} needs {', '.join(missing)}")
        extra = [
            knob
            for knobs in FAMILY_KNOBS.values()
            for knob in knobs
            if knob not in wanted and getattr(self, knob) is not None
        ]
        if extra:
            raise ValueError(f"{self.family} takes no {', '.join(extra)}")
        return self

    def params(self) -> dict[str, float | str]:
        """The point as the sweep's parameters (the names ``suggest`` gives them: family.knob)."""
        return {
            "family": self.family,
            **{f"{self.family}.{knob}": getattr(self, knob) for knob in FAMILY_KNOBS.get(self.family, ())},
        }


class CompressConfig(StrictModel):
    enabled: bool = Field(default=False, description="Run the compression sweep as part of `loom run` (after train).")
    families: list[Family] = Field(
        default_factory=lambda: ["bnb_int8", "bnb_nf4", "w8a8", "prune", "distill"],
        description="Compressions the sweep chooses among: " + "; ".join(f"{k}: {v}" for k, v in FAMILIES.items()),
    )
    prune: PruneSpace = Field(default_factory=PruneSpace, description="The pruning family's knobs.")
    distill: DistillSpace = Field(default_factory=DistillSpace, description="The distillation family's knobs.")
    num_trials: int = Field(default=6, ge=1, description="Compressed candidates Optuna proposes.")
    try_first: list[CandidatePoint] = Field(
        default_factory=list,
        description="Candidates measured before Optuna proposes its own, in this order (they count toward "
        "num_trials and Optuna learns from them).",
    )
    search: Literal["tpe", "random"] = Field(
        default="tpe",
        description="How Optuna proposes candidates: tpe (multi-objective TPE, learning from the candidates so "
        "far) or random. Seeded by the recipe's seed.",
    )
    max_perplexity_increase: float = Field(
        default=0.05,
        gt=0,
        description="Constraint: a candidate is on the front only if its held-out perplexity is at most the base "
        "model's (measured in the same engine) times 1 + this.",
    )
    eval_rows: int = Field(default=32, ge=1, description="Held-out rows (packed sequences) perplexity is measured on.")
    calibration_rows: int = Field(
        default=16, ge=1, description="Held-out rows that score heads and channels for pruning."
    )
    speed: SpeedLoad = Field(default_factory=SpeedLoad, description="The load tokens/s and latency are measured under.")
    draft: DraftProbe = Field(
        default_factory=DraftProbe, description="Speculative decoding with the distilled student as the draft."
    )
    use_gpu: bool = Field(default=False, description="Give each trial a GPU (compress and measure on it).")
    cpus_per_trial: int = Field(default=1, ge=1, description="CPUs Ray reserves for each trial.")

    @field_validator("families")
    @classmethod
    def _families(cls, families: list[str]) -> list[str]:
        if not families:
            raise ValueError("needs at least one family, e.g. [w8a8, prune]")
        if len(set(families)) != len(families):
            raise ValueError(f"lists a family twice: {families}")
        return families

    @model_validator(mode="after")
    def _points_inside_the_space(self) -> CompressConfig:
        problems = []
        for i, point in enumerate(self.try_first):
            if point.family not in self.families:
                problems.append((f"try_first.{i}.family", f"{point.family} is not among families {self.families}"))
            space = {"prune": self.prune, "distill": self.distill}.get(point.family)
            for knob in FAMILY_KNOBS.get(point.family, ()):
                bounds, value = getattr(space, knob), getattr(point, knob)
                if isinstance(bounds, FractionRange) and not bounds.low <= value <= bounds.high:
                    problems.append(
                        (
                            f"try_first.{i}.{knob}",
                            f"{value} is outside {point.family}.{knob} [{bounds.low}, {bounds.high}]",
                        )
                    )
            if point.family == "prune" and point.then_quantize not in self.prune.then_quantize:
                problems.append(
                    (f"try_first.{i}.then_quantize", f"{point.then_quantize} is not in {self.prune.then_quantize}")
                )
        if len(self.try_first) > self.num_trials:
            problems.append(("try_first", f"{len(self.try_first)} points exceed num_trials ({self.num_trials})"))
        if problems:
            raise field_problems(problems)
        return self
