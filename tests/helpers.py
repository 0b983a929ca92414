"""What tests build again and again: document tables, union-find components, waits, placement groups, and Tune's
saved state."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pytest


def document_table(texts: Sequence[str], doc_ids: Sequence[str] | None = None, *, source: str = "test",
                   reasons: Sequence[str | None] | None = None) -> pa.Table:  # fmt: skip
    """Documents as the readers hand them to a step (doc_id, source, text, reject_reason)."""
    n = len(texts)
    return pa.table(
        {
            "doc_id": list(doc_ids) if doc_ids is not None else [f"d{i}" for i in range(n)],
            "source": [source] * n,
            "text": list(texts),
            "reject_reason": pa.array(list(reasons) if reasons is not None else [None] * n, pa.string()),
        }
    )


def union_find_roots(nodes: Iterable[Hashable], edges: Iterable[tuple[Hashable, Hashable]]) -> dict:
    """Every node's component root, the smallest node of its component (the reference for dedup)."""
    parent = {node: node for node in nodes}

    def find(node):
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for u, v in edges:
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    return {node: find(node) for node in parent}


def wait_for(
    condition: Callable[[], bool], timeout_s: float, what: str | Callable[[], str], poll_s: float = 0.5
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s`` (a callable: called then, so
    that it can describe the state at the timeout)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what() if callable(what) else what}")


#: How long a test waits for Ray to give back what a stage reserved. Ray does it asynchronously (Ray Train's
#: placement-group cleaner polls every second; Serve stops replicas one control loop at a time), and on a machine
#: that other work loads, seconds become minutes: a ceiling, not an expectation.
RELEASE_S = 300


def placement_groups() -> dict[str, dict]:
    """Every placement group of this process's Ray cluster, by id, from the GCS (``placement_group_table``).

    Not Ray's State API (``ray.util.state``): called without an address, that finds "the" cluster on the machine
    by looking for GCS processes, and fails ("Found multiple active Ray instances") when another Ray runs there.
    """
    import ray

    return ray.util.placement_group_table()


@contextmanager
def placement_groups_created() -> Iterator[set[str]]:
    """The ids of the placement groups created inside the ``with`` block (filled in when it ends)."""
    before = set(placement_groups())
    created: set[str] = set()
    try:
        yield created
    finally:
        created.update(set(placement_groups()) - before)


def reserved(ids: Iterable[str]) -> list[dict]:
    """Those of ``ids`` that still hold, or wait for, their bundles: every state but REMOVED (the GCS forgets a
    removed group after a while, so one no longer in the table is released too)."""
    table = placement_groups()
    return [table[pg] for pg in ids if pg in table and table[pg]["state"] != "REMOVED"]


def describe_placement_groups(groups: Iterable[dict]) -> str:
    return "; ".join(
        f"{g['placement_group_id']} name={g['name']!r} state={g['state']} strategy={g['strategy']} "
        f"bundles={list(g['bundles'].values())}"
        for g in groups
    )


def wait_released(ids: Iterable[str], what: str, timeout_s: float = RELEASE_S) -> None:
    """Wait until every placement group of ``ids`` is removed; fail naming those still reserved."""
    ids = set(ids)
    held: list[dict] = []

    def released() -> bool:
        held[:] = reserved(ids)
        return not held

    try:
        wait_for(released, timeout_s, what, poll_s=1)
    except AssertionError as error:
        raise AssertionError(f"{error}; still reserved: {describe_placement_groups(held)}") from None


def finished_trials(sweep: Path) -> dict[str, Path]:
    """The trials Tune's saved sweep state records as finished (what Tuner.restore keeps), by id, with each
    one's directory. Tune 2.60 saves this state every 10 s or so, and the restore reads no more than that."""
    finished = {}
    for state in sweep.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError):  # being rewritten right now
            continue
        for trial_json, _ in trials:
            trial = json.loads(trial_json)
            if trial["status"] == "TERMINATED":
                finished[trial["trial_id"]] = next(sweep.glob(f"*_{trial['trial_id']}_*"))
    return finished


def kill_after_first_finished_trial(command: list[str], sweep: Path, log_path: Path, timeout_s: float, **popen) -> dict:
    """Run a sweep's driver (``command``), SIGKILL it once Tune's saved state records a finished trial (or
    it exits, or ``timeout_s`` passes); the trials the saved state then holds as finished, by id."""
    with log_path.open("w") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **popen)
        deadline = time.monotonic() + timeout_s
        while not finished_trials(sweep) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    kept = finished_trials(sweep)
    assert driver.returncode == -signal.SIGKILL and len(kept) == 1, (log_path.read_text()[-3000:], kept)
    return kept


def system_tool(name: str) -> str:
    """Path of a program from the system's packages: skipped without it, failed under CI (which installs it)."""
    found = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
    if found is None:
        message = f"{name} is not installed (`make system-packages` installs it; .ci/run calls it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found
