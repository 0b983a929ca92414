"""The data stage's progress line: parts weighted by earlier runs' seconds at their sizes, resumed parts out of the
total."""

from __future__ import annotations

import json

import pytest

from pipelines.progress import PartsProgress


def _profile(path, *runs):
    path.write_text(json.dumps({"runs": [{"size": size, "seconds": seconds} for size, seconds in runs]}))
    return path


def test_a_first_run_counts_parts_alike_and_leaves_its_seconds_and_size_for_the_next(tmp_path, monkeypatch):
    profile = tmp_path / ".loom" / "data-progress.json"
    clock = iter([0.0, 1.0, 31.0, 33.0])
    monkeypatch.setattr("pipelines.progress.time.monotonic", lambda: next(clock, 33.0))
    with PartsProgress("data", ["read", "repetition", "length"], profile) as bar:
        assert bar.bar.total == 3
        bar.sized(1000)
        bar.done("read")
        assert bar.bar.n == 1
        bar.done("repetition")
        bar.done("length")
    assert json.loads(profile.read_text()) == {
        "runs": [{"size": 1000, "seconds": {"read": 1.0, "repetition": 30.0, "length": 2.0}}]
    }


def test_parts_weigh_their_seconds_scaled_to_this_runs_size_and_resumed_parts_leave_the_total(tmp_path):
    profile = _profile(tmp_path / "data-progress.json", (1000, {"read": 1.0, "repetition": 30.0, "length": 2.0}))
    with PartsProgress("data", ["read", "repetition", "length", "new"], profile) as bar:
        # Before the size is known: the last run's seconds; "new" was not timed: the mean of those that were.
        assert bar.weights == {"read": 1.0, "repetition": 30.0, "length": 2.0, "new": 11.0}
        bar.sized(2000)  # one size seen before: twice the rows, twice the seconds
        assert bar.weights == {"read": 2.0, "repetition": 60.0, "length": 4.0, "new": 22.0}
        bar.done("read", resumed=True)
        assert (bar.bar.n, bar.bar.total) == (0, 86.0)
        bar.done("repetition")
        assert bar.bar.n == 60.0
        with pytest.raises(ValueError, match="'tokenize' is not one of this stage's parts"):
            bar.done("tokenize")
    runs = json.loads(profile.read_text())["runs"]
    assert [run["size"] for run in runs] == [1000, 2000] and "read" not in runs[-1]["seconds"]  # read was resumed


def test_with_two_sizes_seen_a_part_is_a_fixed_cost_plus_a_cost_per_row(tmp_path):
    profile = _profile(
        tmp_path / "data-progress.json",
        (100, {"tokenizer": 30.0, "tokenize": 20.0}),
        (300, {"tokenizer": 30.0, "tokenize": 60.0}),
        (100, {"tokenizer": 40.0, "tokenize": 20.0}),  # the latest run of a size is the one that counts
    )
    # tokenizer: 40 s at 100 rows and 30 s at 300 is a fixed cost (a part never gets cheaper with more rows)
    with PartsProgress("data", ["tokenizer", "tokenize"], profile) as bar:
        bar.sized(1000)
        assert bar.weights == pytest.approx({"tokenizer": 35.0, "tokenize": 200.0})


def test_a_stage_that_fails_leaves_the_profile_as_it_was(tmp_path):
    profile = _profile(tmp_path / "data-progress.json", (10, {"read": 4.0}))
    before = profile.read_text()
    with pytest.raises(RuntimeError), PartsProgress("data", ["read", "pack"], profile) as bar:
        bar.done("read")
        raise RuntimeError("pack failed")
    assert profile.read_text() == before
