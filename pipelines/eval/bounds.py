"""Decisions by eval: bounds on the eval stage's scores that a compressed variant must keep to be chosen
(serve's variant choice names them). Imports nothing heavy: recipes read it."""

from __future__ import annotations

from pydantic import Field

from pipelines.artifacts import EvalSummary, ModelScores
from pipelines.schema import StrictModel

BASE = "base"


class EvalMetric(StrictModel):
    """One metric of one of the run's eval tasks (a sweep's objective names one; a bound adds a tolerance)."""

    task: str = Field(
        description="A task of the run's eval stage (eval/eval.json): loom_choice, loom_next_line, "
        "loom_perplexity_<source>."
    )
    metric: str | None = Field(
        default=None,
        description="One of the task's metrics (acc, acc_norm, exact_match, bits_per_byte, word_perplexity, ...). "
        "Unset: the task's headline. Higher or lower is better as the task says.",
    )


class EvalBound(EvalMetric):
    """A variant keeps this bound if its score on ``task`` is at most ``tolerance`` worse than the base model's,
    as a fraction of the base's score, in the task's direction (lower bits per byte, higher accuracy)."""

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
    return score_failures(summary, summary.models.get(model), summary.models[BASE], bounds, against=BASE)


def score_failures(
    summary: EvalSummary,
    scores: ModelScores | None,
    reference: ModelScores | None,
    bounds: list[EvalBound],
    against: str,
) -> list[str]:
    """Why ``scores`` fail ``bounds`` against ``reference`` (named ``against`` in the reasons), both models of
    ``summary``; None or a model not scored fails every bound."""
    failures = []
    for bound in bounds:
        info = summary.tasks.get(bound.task)
        if info is None:
            raise UnknownBoundError(
                f"eval bound on {bound.task!r}: the eval stage scored no such task; its tasks: {', '.join(summary.tasks)}"
            )
        metric = bound.metric or info.headline
        known = summary.models[BASE].tasks.get(bound.task, {})
        if metric not in known:
            raise UnknownBoundError(
                f"eval bound on {bound.task}: the harness reported no metric {metric!r}; its metrics: {', '.join(known)}"
            )
        unscored = [
            f"the eval stage did not score {who}"
            + (f" ({model.not_scored})" if model is not None and model.not_scored else "")
            for model, who in ((scores, "it"), (reference, against))
            if model is None or metric not in model.tasks.get(bound.task, {})
        ]
        if unscored:
            failures.append(f"{bound.task}.{metric}: {'; '.join(unscored)}")
            continue
        limit_of, value = reference.tasks[bound.task][metric].value, scores.tasks[bound.task][metric].value
        if info.lower_is_better:
            limit, holds, word = limit_of * (1 + bound.tolerance), value <= limit_of * (1 + bound.tolerance), "above"
        else:
            limit, holds, word = limit_of * (1 - bound.tolerance), value >= limit_of * (1 - bound.tolerance), "below"
        if not holds:
            failures.append(
                f"{bound.task}.{metric} {value:.4g} {word} the bound {limit:.4g} "
                f"({against} {limit_of:.4g}, tolerance {bound.tolerance:g})"
            )
    return failures
