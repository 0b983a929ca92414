"""Decisions by eval: bounds on the eval stage's scores that a compressed variant must keep to be chosen
(serve's variant choice names them). Imports nothing heavy: recipes read it."""

from __future__ import annotations

from pydantic import Field

from pipelines.artifacts import EvalSummary
from pipelines.schema import StrictModel

BASE = "base"


class EvalBound(StrictModel):
    """A variant keeps this bound if its score on ``task`` is at most ``tolerance`` worse than the base model's,
    as a fraction of the base's score, in the task's direction (lower bits per byte, higher accuracy)."""

    task: str = Field(
        description="A task of the run's eval stage (eval/eval.json): loom_choice, loom_next_line, "
        "loom_perplexity_<source>."
    )
    metric: str | None = Field(
        default=None,
        description="One of the task's metrics (acc, acc_norm, exact_match, bits_per_byte, word_perplexity, ...). "
        "Unset: the task's headline.",
    )
    tolerance: float = Field(
        gt=-1,
        description="How much worse than the base's score a variant's may be, as a fraction of the base's: 0.05 "
        "allows 5% lower accuracy or 5% more bits per byte; 0 allows nothing worse; a negative tolerance asks "
        "for better (-0.01: at least 1% better, e.g. of a pruned model after its recovery fine-tune).",
    )


class UnknownBoundError(ValueError):
    """A bound names a task or metric the eval stage did not score."""


def bound_failures(summary: EvalSummary, model: str, bounds: list[EvalBound]) -> list[str]:
    """Why ``model`` fails ``bounds`` against the base in ``summary`` (empty: it keeps every one). Raises
    UnknownBoundError, listing what was scored, for a bound whose task or metric the stage did not score."""
    base = summary.models[BASE]
    scores = summary.models.get(model)
    failures = []
    for bound in bounds:
        info = summary.tasks.get(bound.task)
        if info is None:
            raise UnknownBoundError(
                f"eval bound on {bound.task!r}: the eval stage scored no such task; its tasks: {', '.join(summary.tasks)}"
            )
        metric = bound.metric or info.headline
        if metric not in base.tasks.get(bound.task, {}):
            raise UnknownBoundError(
                f"eval bound on {bound.task}: the harness reported no metric {metric!r}; its metrics: "
                + ", ".join(base.tasks.get(bound.task, {}))
            )
        if scores is None or scores.not_scored is not None:
            why = "the eval stage did not score it" if scores is None else f"not scored ({scores.not_scored})"
            failures.append(f"{bound.task}.{metric}: {why}")
            continue
        reference, value = base.tasks[bound.task][metric].value, scores.tasks[bound.task][metric].value
        if info.lower_is_better:
            limit, holds, word = reference * (1 + bound.tolerance), value <= reference * (1 + bound.tolerance), "above"
        else:
            limit, holds, word = reference * (1 - bound.tolerance), value >= reference * (1 - bound.tolerance), "below"
        if not holds:
            failures.append(
                f"{bound.task}.{metric} {value:.4g} {word} the bound {limit:.4g} "
                f"(base {reference:.4g}, tolerance {bound.tolerance:g})"
            )
    return failures
