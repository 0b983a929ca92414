"""The eval stage's tasks, built from held-out documents without the harness."""

from __future__ import annotations

import json

import pytest

from pipelines.eval.config import EvalConfig
from pipelines.eval.tasks import FIRST_LINE, KIND_METRICS, PREFIX, HeldOutDocument, build_tasks, question, task_names


def _document(i: int, source: str = "code") -> HeldOutDocument:
    lines = [f"def function_{i}_{n}(value):\n    return value + {i * 10 + n}\n\n" for n in range(12)]
    return HeldOutDocument(f"{i:016x}", source, "".join(lines))


def test_a_question_cuts_at_a_line_end_and_its_continuation_follows():
    document = _document(3)
    q = question(document, EvalConfig(context_chars=60, continuation_chars=40))
    assert q is not None and q.context.endswith("\n") and q.context and len(q.context) <= 60 + 2
    assert document.text.startswith(q.context + q.continuation)
    assert q.continuation.strip() and not q.continuation.startswith("\n") and q.continuation.endswith("\n")
    assert question(HeldOutDocument("0", "code", "one line, nothing after it"), EvalConfig()) is None


def test_long_lines_blank_lines_and_list_like_text_make_sound_questions(tmp_path):
    import re

    config = EvalConfig(context_chars=40, continuation_chars=30)
    one_line = HeldOutDocument("1", "prose", "word " * 100)  # a paragraph on one line: cut at a space
    q = question(one_line, config)
    assert q is not None and len(q.context) <= 40 and len(q.continuation) <= 30
    assert q.context.endswith(" ") and one_line.text.startswith(q.context + q.continuation)
    crlf = HeldOutDocument("2", "code", "\n\nfirst = 1\r\n  \r\n\r\nsecond = [1, 2]\r\n")
    q = question(crlf, EvalConfig(context_chars=16, continuation_chars=30))
    assert q is not None and q.context.startswith("first = 1") and q.continuation == "second = [1, 2]\r\n"
    # "[1, 2]" stays text: the task reads fields by name, not through a template the harness would evaluate.
    (task,) = build_tasks([crlf], EvalConfig(tasks=["next_line"], context_chars=16), tmp_path, seed=0)
    assert json.loads(task.path.read_text())["target"] == "second = [1, 2]"
    assert task.config["doc_to_target"] == "target"
    # What the model generates is read as its first line with text, indentation kept.
    assert re.findall(FIRST_LINE, "\n\n    return x\nmore") == ["    return x"]
    assert re.findall(FIRST_LINE, "") == [""]


def test_tasks_hold_what_the_documents_say(tmp_path):
    documents = [_document(i, "code") for i in range(6)] + [_document(i, "prose docs") for i in range(6, 10)]
    config = EvalConfig(documents=5, choices=3, context_chars=60, continuation_chars=40)
    tasks = {task.name: task for task in build_tasks(documents, config, tmp_path, seed=1)}
    assert set(tasks) == {
        f"{PREFIX}perplexity_code",
        f"{PREFIX}perplexity_prose_docs",
        f"{PREFIX}choice",
        f"{PREFIX}next_line",
    }
    # What a recipe is checked against before any task is built: the same names, kinds and metrics.
    assert task_names(config, ["prose docs", "code"]) == {name: task.kind for name, task in tasks.items()}
    for task in tasks.values():
        assert tuple(entry["metric"] for entry in task.config["metric_list"]) == KIND_METRICS[task.kind]
    texts = {d.doc_id: d.text for d in documents}

    perplexity = [json.loads(line) for line in tasks[f"{PREFIX}perplexity_code"].path.read_text().splitlines()]
    assert len(perplexity) == 5 and all(texts[row["doc_id"]].startswith(row["text"]) for row in perplexity)

    choice = [json.loads(line) for line in tasks[f"{PREFIX}choice"].path.read_text().splitlines()]
    assert len(choice) == tasks[f"{PREFIX}choice"].rows == 9  # 5 code + 4 prose documents
    golds = set()
    for row in choice:
        assert len(row["choices"]) == 3 and len(set(row["choices"])) == 3
        true = row["choices"][row["gold"]]
        assert texts[row["doc_id"]].startswith(row["context"] + true)  # the true continuation is the document's
        assert not any(texts[row["doc_id"]].startswith(row["context"] + c) for c in row["choices"] if c != true)
        golds.add(row["gold"])
    assert len(golds) > 1  # the true continuation is not always in one place

    next_line = [json.loads(line) for line in tasks[f"{PREFIX}next_line"].path.read_text().splitlines()]
    assert next_line
    for row in next_line:
        text = texts[row["doc_id"]]
        # The context ends before its newlines, as training text does; the target is the next line with text.
        assert text.startswith(row["context"]) and not row["context"].endswith("\n")
        assert text[len(row["context"]) :].lstrip("\n").startswith(row["target"]) and "\n" not in row["target"]
    harness = tasks[f"{PREFIX}next_line"].harness_config(tmp_path / "cache")
    assert harness["output_type"] == "generate_until" and harness["generation_kwargs"]["until"] == []
    assert harness["filter_list"][0]["filter"][0]["regex_pattern"] == FIRST_LINE
    assert harness["dataset_kwargs"]["data_files"]["test"] == str(tasks[f"{PREFIX}next_line"].path)


def test_the_same_documents_and_seed_build_the_same_tasks(tmp_path):
    documents = [_document(i) for i in range(8)]
    first = build_tasks(documents, EvalConfig(), tmp_path / "a", seed=0)
    again = build_tasks(list(reversed(documents)), EvalConfig(), tmp_path / "b", seed=0)
    assert [t.path.read_text() for t in first] == [t.path.read_text() for t in again]


def test_no_task_from_documents_without_lines_to_continue_says_why(tmp_path):
    documents = [HeldOutDocument(f"{i}", "code", "a single line") for i in range(3)]
    with pytest.raises(ValueError, match="no task could be built"):
        build_tasks(documents, EvalConfig(tasks=["choice", "next_line"]), tmp_path, seed=0)


def test_the_harness_results_are_read_metric_by_metric_with_their_errors():
    from pipelines.eval.harness import _metrics

    reported = {
        "alias": "loom_choice",
        "sample_len": 12,
        "acc,none": 0.5,
        "acc_stderr,none": 0.15,
        "bits_per_byte,none": 2.5,
        "bits_per_byte_stderr,none": "N/A",
    }
    scores = _metrics(reported)
    assert set(scores) == {"acc", "bits_per_byte"}
    assert (scores["acc"].value, scores["acc"].stderr) == (0.5, 0.15)
    assert scores["bits_per_byte"].stderr is None  # the harness's "N/A"
