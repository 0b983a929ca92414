"""The ``eval`` section of a recipe: which tasks are built from the run's held-out documents, and how they
are scored. Imports nothing heavy: every recipe reads it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.schema import StrictModel

TaskKind = Literal["perplexity", "choice", "next_line"]

#: What each task kind measures, for people reading a recipe or the report.
TASK_KINDS: dict[str, str] = {
    "perplexity": "held-out perplexity per source: the harness's loglikelihood_rolling over each document "
    "(word and byte perplexity, bits per byte)",
    "choice": "multiple choice: a document's opening lines, its true continuation against continuations of "
    "other documents, scored by log-likelihood (acc, acc_norm)",
    "next_line": "the next non-empty line after a document's opening lines, generated greedily to the line's "
    "end and scored by exact match",
}


class EvalConfig(StrictModel):
    enabled: bool = Field(
        default=True, description="Score the trained model (and the compressed variants) after train and compress."
    )
    tasks: list[TaskKind] = Field(
        default_factory=lambda: ["perplexity", "choice", "next_line"],
        min_length=1,
        description="Task kinds built from the held-out documents: "
        + "; ".join(f"{k}: {v}" for k, v in TASK_KINDS.items()),
    )
    documents: int = Field(
        default=32,
        ge=2,
        description="Held-out documents per source the tasks are built from (at most data.heldout_documents).",
    )
    choices: int = Field(default=4, ge=2, description="Continuations per multiple-choice question (one true).")
    context_chars: int = Field(
        default=256,
        ge=16,
        description="A question's context: the document's first lines, up to about this many characters.",
    )
    continuation_chars: int = Field(
        default=128,
        ge=8,
        description="A true or drawn continuation: the lines that follow, up to about this many characters "
        "(data.seq_len when that is less: a continuation must fit the context the model is scored in, and a "
        "byte-level token holds at least one character).",
    )
    perplexity_chars: int = Field(
        default=4096, ge=64, description="Characters of each document the perplexity tasks score (its beginning)."
    )
    max_gen_tokens: int = Field(default=32, ge=1, description="Tokens a next_line answer may generate.")
    batch_size: int = Field(default=8, ge=1, description="The harness's batch size.")
    variants: bool = Field(
        default=True, description="Also score each compressed variant on the front (when compress is on)."
    )
