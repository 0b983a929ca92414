"""The data stage's progress line: parts weighted by the previous run's seconds, resumed parts out of the total."""

from __future__ import annotations

import json

import pytest

from pipelines.progress import PartsProgress


def test_a_first_run_counts_parts_alike_and_leaves_their_seconds_for_the_next(tmp_path, monkeypatch):
    profile = tmp_path / ".loom" / "data-progress.json"
    clock = iter([0.0, 1.0, 31.0, 33.0])
    monkeypatch.setattr("pipelines.progress.time.monotonic", lambda: next(clock, 33.0))
    with PartsProgress("data", ["read", "repetition", "length"], profile) as bar:
        assert bar.bar.total == 3
        bar.done("read")
        assert bar.bar.n == 1
        bar.done("repetition")
        bar.done("length")
    assert json.loads(profile.read_text()) == {"read": 1.0, "repetition": 30.0, "length": 2.0}


def test_later_runs_weigh_parts_by_those_seconds_and_resumed_parts_leave_the_total(tmp_path):
    profile = tmp_path / "data-progress.json"
    profile.write_text(json.dumps({"read": 1.0, "repetition": 30.0, "length": 2.0, "gone": 5.0}))
    with PartsProgress("data", ["read", "repetition", "length", "new"], profile) as bar:
        # "new" was not in the last run: it weighs the mean of the parts that were (11).
        assert bar.weights == {"read": 1.0, "repetition": 30.0, "length": 2.0, "new": 11.0}
        bar.done("read", resumed=True)
        assert (bar.bar.n, bar.bar.total) == (0, 43.0)
        bar.done("repetition")
        assert bar.bar.n == 30.0 and bar.bar.format_dict["total"] == 43.0
        with pytest.raises(ValueError, match="'tokenize' is not one of this stage's parts"):
            bar.done("tokenize")
    written = json.loads(profile.read_text())
    assert written["read"] == 1.0 and written["gone"] == 5.0  # a resumed part keeps its earlier seconds


def test_a_stage_that_fails_leaves_the_profile_as_it_was(tmp_path):
    profile = tmp_path / "data-progress.json"
    profile.write_text(json.dumps({"read": 4.0}))
    with pytest.raises(RuntimeError), PartsProgress("data", ["read", "pack"], profile) as bar:
        bar.done("read")
        raise RuntimeError("pack failed")
    assert json.loads(profile.read_text()) == {"read": 4.0}
