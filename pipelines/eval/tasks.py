"""Tasks built from the run's held-out documents, in lm-evaluation-harness's own task format.

Each task is a JSON-lines file of documents plus the harness's task config (the dict a task YAML holds),
read with the harness's ``json`` dataset loader: nothing is downloaded, and a task is added by writing one
more builder that returns rows and a config. Plain Python: building and checking tasks needs no harness.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.eval.config import EvalConfig

#: Task names start with this, so they cannot shadow a task of the harness's own.
PREFIX = "loom_"


@dataclass(frozen=True)
class HeldOutDocument:
    doc_id: str
    source: str
    text: str


@dataclass(frozen=True)
class Task:
    """One built task: its rows on disk and what the harness needs to score them."""

    name: str
    kind: str
    path: Path
    rows: int
    #: The metric the report leads with, and whether lower is better.
    headline: str
    lower_is_better: bool
    config: dict[str, Any]

    @classmethod
    def written(cls, root: Path, name: str, kind: str, rows: list[dict[str, Any]], **fields: Any) -> Task:
        """The task whose rows are written to ``root/<name>.jsonl`` (``fields``: headline, lower_is_better, config)."""
        return cls(name=name, kind=kind, path=_write(root / f"{name}.jsonl", rows), rows=len(rows), **fields)

    def harness_config(self, cache_dir: Path) -> dict[str, Any]:
        """The harness's task dict: the rows read by its ``json`` loader (cached under ``cache_dir``)."""
        return {
            "task": self.name,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(self.path)}, "cache_dir": str(cache_dir)},
            "test_split": "test",
            **self.config,
        }


@dataclass(frozen=True)
class Question:
    """A document cut after its opening lines: the context, and the lines that follow it."""

    doc_id: str
    source: str
    context: str
    continuation: str


def _slug(source: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", source.lower()).strip("_") or "source"


_BLANK_LINES = re.compile(r"(?:[ \t\r]*\n)*")
#: What a next_line answer is read as: the first line with text in what the model generated.
FIRST_LINE = r"^(?:[ \t\r]*\n)*([^\n]*)"


def _cut(text: str, chars: int) -> str:
    """The text's first whole lines, up to about ``chars`` characters; a first line longer than that is cut
    at its last space before ``chars`` (hard at ``chars`` without one)."""
    if len(text) <= chars:
        return text
    end = text.rfind("\n", 0, chars + 1)
    if end > 0:
        return text[: end + 1]
    space = text.rfind(" ", 0, chars + 1)
    return text[: space + 1] if space > 0 else text[:chars]


def question(document: HeldOutDocument, config: EvalConfig) -> Question | None:
    """The document (without leading blank lines) cut after its opening lines, about ``context_chars``; the
    blank lines after the cut belong to the context. None when nothing but whitespace follows."""
    text = document.text[_BLANK_LINES.match(document.text).end() :]
    context = _cut(text, config.context_chars)
    rest = text[len(context) :]
    skipped = _BLANK_LINES.match(rest).end()
    context, rest = context + rest[:skipped], rest[skipped:]
    continuation = _cut(rest, config.continuation_chars)
    if not context.strip() or not continuation.strip():
        return None
    return Question(document.doc_id, document.source, context, continuation)


@dataclass(frozen=True)
class TaskInputs:
    """What every task builder is given."""

    documents: list[HeldOutDocument]
    questions: list[Question]
    config: EvalConfig
    root: Path
    seed: int


def perplexity_tasks(inputs: TaskInputs) -> list[Task]:
    """One task per source: each document's beginning scored by loglikelihood_rolling."""
    documents, config, root = inputs.documents, inputs.config, inputs.root
    tasks = []
    for source in sorted({d.source for d in documents}):
        rows = [
            {"doc_id": d.doc_id, "text": d.text[: config.perplexity_chars]} for d in documents if d.source == source
        ]
        name = f"{PREFIX}perplexity_{_slug(source)}"
        tasks.append(
            Task.written(
                root,
                name,
                "perplexity",
                rows,
                headline="bits_per_byte",
                lower_is_better=True,
                config={
                    "output_type": "loglikelihood_rolling",
                    # Plain field names, not templates: the harness reads a rendered "[...]" as a Python list.
                    "doc_to_text": "",
                    "doc_to_target": "text",
                    "metric_list": [
                        {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
                        {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
                    ],
                },
            )
        )
    return tasks


def choice_task(inputs: TaskInputs) -> list[Task]:
    """The true continuation against ``choices - 1`` drawn from other documents (the same source first)."""
    questions, config, root = inputs.questions, inputs.config, inputs.root
    rng = random.Random(inputs.seed)
    rows = []
    for q in questions:
        # Distinct continuations, none equal to the true one: (source, continuation) in a stable order.
        others = sorted({(o.source, o.continuation) for o in questions if o.continuation != q.continuation})
        same = [continuation for source, continuation in others if source == q.source]
        every = sorted({continuation for _, continuation in others})
        pool = same if len(same) >= config.choices - 1 else every
        if len(pool) < config.choices - 1:
            continue
        drawn = rng.sample(pool, config.choices - 1)
        gold = rng.randrange(config.choices)
        rows.append(
            {
                "doc_id": q.doc_id,
                "context": q.context,
                "choices": [*drawn[:gold], q.continuation, *drawn[gold:]],
                "gold": gold,
            }
        )
    if not rows:
        return []
    name = f"{PREFIX}choice"
    return [
        Task.written(
            root,
            name,
            "choice",
            rows,
            headline="acc",
            lower_is_better=False,
            config={
                "output_type": "multiple_choice",
                "doc_to_text": "context",
                "doc_to_choice": "choices",
                "doc_to_target": "gold",
                # The context ends in a newline: a choice is appended as is, with no space between.
                "target_delimiter": "",
                "metric_list": [
                    {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
                ],
            },
        )
    ]


def next_line_task(inputs: TaskInputs) -> list[Task]:
    """The next line with text after opening lines that end at a line end, generated greedily.

    The context ends before its trailing newlines, as text in training does (a byte-level BPE merges a
    newline with the indentation after it, so a context ending in a bare newline token starts the answer
    where no training text did); the answer is the first line with text in what the model generates."""
    config = inputs.config
    rows = []
    for q in inputs.questions:
        target = q.continuation.split("\n", 1)[0].rstrip()
        if q.context.endswith("\n") and target.strip() and len(target) <= 3 * config.max_gen_tokens:
            rows.append({"doc_id": q.doc_id, "context": q.context.rstrip(), "target": target})
    if not rows:
        return []
    name = f"{PREFIX}next_line"
    return [
        Task.written(
            inputs.root,
            name,
            "next_line",
            rows,
            headline="exact_match",
            lower_is_better=False,
            config={
                "output_type": "generate_until",
                "doc_to_text": "context",
                "doc_to_target": "target",
                "generation_kwargs": {"until": [], "max_gen_toks": config.max_gen_tokens, "do_sample": False},
                "filter_list": [
                    {
                        "name": "first_line",
                        "filter": [{"function": "regex", "regex_pattern": FIRST_LINE}, {"function": "take_first"}],
                    }
                ],
                # Trailing spaces are not part of the answer; indentation is.
                "metric_list": [
                    {
                        "metric": "exact_match",
                        "aggregation": "mean",
                        "higher_is_better": True,
                        "regexes_to_ignore": [r"\s+$"],
                    }
                ],
            },
        )
    ]


#: Each task kind's builder: add a kind by adding one here (and its name to config.TaskKind).
BUILDERS: dict[str, Callable[[TaskInputs], list[Task]]] = {
    "perplexity": perplexity_tasks,
    "choice": choice_task,
    "next_line": next_line_task,
}


def task_names(config: EvalConfig, sources: Iterable[str]) -> dict[str, str]:
    """The tasks ``config`` can build from held-out documents of these sources, by name, each to its kind (a
    source with no held-out document, or a kind with no question to ask, builds none: known only once the tasks
    are built). Their metrics are ``KIND_METRICS[kind]``."""
    names = {
        "perplexity": [f"{PREFIX}perplexity_{_slug(source)}" for source in sorted(set(sources))],
        "choice": [f"{PREFIX}choice"],
        "next_line": [f"{PREFIX}next_line"],
    }
    return {name: kind for kind in config.tasks for name in names[kind]}


#: The metrics each kind's tasks report (their harness ``metric_list``), for checking a recipe before any task is
#: built; tests/unit/test_eval_tasks.py checks them against the built tasks.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "perplexity": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
    "choice": ("acc", "acc_norm"),
    "next_line": ("exact_match",),
}


def build_tasks(documents: list[HeldOutDocument], config: EvalConfig, root: Path, seed: int) -> list[Task]:
    """Every configured task, from at most ``config.documents`` held-out documents per source (in doc_id order)."""
    root.mkdir(parents=True, exist_ok=True)
    chosen: list[HeldOutDocument] = []
    for source in sorted({d.source for d in documents}):
        chosen += sorted((d for d in documents if d.source == source), key=lambda d: d.doc_id)[: config.documents]
    questions = [q for q in (question(d, config) for d in chosen) if q is not None]
    inputs = TaskInputs(chosen, questions, config, root, seed)
    tasks = [task for kind in config.tasks for task in BUILDERS[kind](inputs)]
    if not tasks:
        raise ValueError(
            f"eval: no task could be built from {len(chosen)} held-out documents (a question needs a document "
            "with lines after its opening ones); raise data.heldout_documents or lower eval.context_chars"
        )
    return tasks


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return path
