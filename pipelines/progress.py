"""One progress line per stage: the terminal shows where a long stage is, not every library's log."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def progress(total: int, stage: str, unit: str):
    """A tqdm bar named ``[loom] STAGE`` (redrawn in place on a terminal, one line when piped)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"[loom] {stage}",
        unit=unit,
        dynamic_ncols=True,
        leave=True,
        file=sys.stdout,
        mininterval=1.0,
        bar_format="{desc}: {n_fmt}/{total_fmt} {unit} |{bar:20}| {elapsed}<{remaining}{postfix}",
    )


class PartsProgress:
    """A stage's progress line over parts of unequal cost, weighted by what each part took last time.

    A stage's parts differ in cost by 30x (a length filter against tokenising), so a line that
    counts parts shows an ETA that is off by a third at halfway. This one weighs each part by its
    seconds in the previous run on the same storage (``profile``, rewritten when the stage ends);
    parts it has not seen count as the mean of those it has, and a first run counts them alike.
    A part read back from an earlier run's files (resumed) leaves the total instead of filling it,
    so the rate is that of the work really done. The ETA is the average rate over the whole run
    (``smoothing=0``): the recent rate swings with each part's cost.
    """

    def __init__(self, stage: str, parts: list[str], profile: Path):
        self.stage, self.parts, self.profile = stage, parts, profile
        known = {part: seconds for part, seconds in _read_profile(profile).items() if part in parts and seconds > 0}
        default = sum(known.values()) / len(known) if known else 1.0
        self.weights = {part: known.get(part, default) for part in parts}
        self.seconds: dict[str, float] = {}
        self.last = time.monotonic()
        self.bar = _bar(sum(self.weights.values()), stage)
        self.bar.set_postfix_str(f"{parts[0]} (1/{len(parts)})", refresh=False)

    def note(self, text: str) -> None:
        """What the current part is doing, shown after the ETA."""
        self.bar.set_postfix_str(text, refresh=False)

    def done(self, part: str, note: str = "", resumed: bool = False) -> None:
        """``part`` finished (or was read back, ``resumed``): move the line on by its weight."""
        if part not in self.weights:
            raise ValueError(f"progress: {part!r} is not one of this stage's parts {self.parts}")
        now = time.monotonic()
        if resumed:
            self.bar.total -= self.weights[part]
        else:
            self.seconds[part] = now - self.last
            self.bar.n += self.weights[part]
        self.last = now
        position = self.parts.index(part) + 1
        following = (
            f"; next {self.parts[position]} ({position + 1}/{len(self.parts)})" if position < len(self.parts) else ""
        )
        self.note(f"{note or part}{' (resumed)' if resumed else ''}{following}")
        self.bar.refresh()

    def __enter__(self) -> PartsProgress:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.bar.close()
        if error is None and self.seconds:
            profile = {**_read_profile(self.profile), **{part: round(s, 3) for part, s in self.seconds.items()}}
            self.profile.parent.mkdir(parents=True, exist_ok=True)
            partial = self.profile.with_suffix(".partial")
            partial.write_text(json.dumps(profile, indent=2) + "\n")
            partial.replace(self.profile)


def _read_profile(path: Path) -> dict[str, float]:
    try:
        found = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}  # no earlier run, or a file cut short: count the parts alike
    return {str(k): float(v) for k, v in found.items() if isinstance(v, int | float)} if isinstance(found, dict) else {}


def _bar(total: float, stage: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"[loom] {stage}",
        dynamic_ncols=True,
        leave=True,
        file=sys.stdout,
        mininterval=1.0,
        smoothing=0,
        bar_format="{desc}: {percentage:3.0f}% |{bar:20}| {elapsed}<{remaining}{postfix}",
    )


@contextlib.contextmanager
def follow_steps(metrics_log: Path, total: int, stage: str) -> Iterator[None]:
    """A progress line that follows a run's metrics log (JSON lines with ``step`` and ``loss``) while the
    body runs: the reports are written by Ray Train's controller, which is not this process."""
    stop = threading.Event()
    with progress(total, stage, "steps") as bar:

        def update() -> None:
            rows = [json.loads(line) for line in _lines(metrics_log)]
            steps = [row for row in rows if "step" in row and not row.get("final")]
            if steps:
                bar.n = min(total, max(int(row["step"]) for row in steps))
                bar.set_postfix_str(f"loss {float(steps[-1]['loss']):.3f}", refresh=False)
                bar.refresh()

        def poll() -> None:
            while not stop.wait(1.0):
                update()

        follower = threading.Thread(target=poll, name=f"{stage}-progress", daemon=True)
        follower.start()
        try:
            yield
        finally:
            stop.set()
            follower.join()
            update()


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return []
