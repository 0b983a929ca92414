"""One progress line per stage: the terminal shows where a long stage is, not every library's log."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def progress(total: float, stage: str, unit: str, counts: str = "{n_fmt}/{total_fmt} {unit}", **options):
    """A tqdm bar named ``[loom] STAGE`` (redrawn in place on a terminal, one line when piped); ``counts`` is
    what it shows before the bar, ``options`` other tqdm settings."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=f"[loom] {stage}",
        unit=unit,
        dynamic_ncols=True,
        leave=True,
        file=sys.stdout,
        mininterval=1.0,
        bar_format="{desc}: " + counts + " |{bar:20}| {elapsed}<{remaining}{postfix}",
        **options,
    )


class PartsProgress:
    """A stage's progress line over parts of unequal cost, weighted by what each part took before.

    A stage's parts differ in cost by 30x (a length filter against tokenising), so a line that
    counts parts shows an ETA that is off by a third at halfway. This one weighs each part by the
    seconds it took in earlier runs on the same storage (``profile``: the last ``KEEP`` runs, each
    with its input size, rewritten when the stage ends). Once ``sized`` gives this run's input size,
    each part's seconds are a straight line through the earlier sizes (a fixed cost plus a cost per
    input row), or proportional to the size when only one size was seen. Parts never seen weigh the
    mean of those that were; a first run counts them alike. A part read back from an earlier run's
    files (resumed) leaves the total instead of filling it, so the rate is that of the work really
    done. The ETA is the average rate over the whole run (``smoothing=0``): the recent rate swings
    with each part's cost.
    """

    KEEP = 8

    def __init__(self, stage: str, parts: list[str], profile: Path):
        self.stage, self.parts, self.profile = stage, parts, profile
        self.history = _read_profile(profile)
        self.size: int | None = None
        self.seconds: dict[str, float] = {}
        self.resumed: set[str] = set()
        self.weights = self._weights()
        self.last = time.monotonic()
        self.bar = progress(sum(self.weights.values()), stage, "", counts="{percentage:3.0f}%", smoothing=0)
        self.bar.set_postfix_str(f"{parts[0]} (1/{len(parts)})")

    def _weights(self) -> dict[str, float]:
        known = {part: estimate for part in self.parts if (estimate := _estimate(self.history, part, self.size))}
        default = sum(known.values()) / len(known) if known else 1.0
        return {part: known.get(part, default) for part in self.parts}

    def sized(self, size: int) -> None:
        """This run's input size (rows read): the parts are weighed again for it."""
        self.size = size
        self.weights = self._weights()
        self.bar.total = sum(weight for part, weight in self.weights.items() if part not in self.resumed)
        self.bar.n = sum(self.weights[part] for part in self.seconds)

    def note(self, text: str) -> None:
        """What the current part is doing, shown after the ETA."""
        self.bar.set_postfix_str(text, refresh=False)

    def done(self, part: str, note: str = "", resumed: bool = False) -> None:
        """``part`` finished (or was read back, ``resumed``): move the line on by its weight."""
        if part not in self.weights:
            raise ValueError(f"progress: {part!r} is not one of this stage's parts {self.parts}")
        now = time.monotonic()
        if resumed:
            self.resumed.add(part)
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
        if error is not None or not self.seconds:
            return
        run = {"size": self.size, "seconds": {part: round(s, 3) for part, s in self.seconds.items()}}
        runs = [*_read_profile(self.profile), run][-self.KEEP :]
        # Per process: two stages on one storage may finish together. Only the next line's weights
        # depend on this file, so failing to write it costs a warning, not the finished stage.
        partial = self.profile.with_name(f"{self.profile.name}.{os.getpid()}.partial")
        try:
            self.profile.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
            partial.replace(self.profile)
        except OSError as failed:
            log.warning("progress: could not save the part times to %s (%s)", self.profile, failed)


def _read_profile(path: Path) -> list[dict]:
    """Earlier runs, oldest first: {"size": rows in or None, "seconds": {part: seconds}}."""
    try:
        found = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return []  # no earlier run, or a file cut short: count the parts alike
    runs = found.get("runs") if isinstance(found, dict) else None
    if not isinstance(runs, list):
        return []
    return [
        {"size": run.get("size") if isinstance(run.get("size"), int) else None, "seconds": run["seconds"]}
        for run in runs
        if isinstance(run, dict) and isinstance(run.get("seconds"), dict)
    ]


def _estimate(history: list[dict], part: str, size: int | None) -> float | None:
    """Seconds ``part`` should take at ``size`` rows, from the runs in ``history`` that timed it (None: none did)."""
    timed = [(run["size"], float(run["seconds"][part])) for run in history if part in run["seconds"]]
    if not timed:
        return None
    latest_size, latest = timed[-1]
    if size is None or latest_size is None:
        return max(latest, 1e-3)
    by_size = {run_size: seconds for run_size, seconds in timed if run_size is not None}  # the latest per size
    if len(by_size) == 1:
        return max(latest * size / latest_size, 1e-3)
    # Least squares through (size, seconds): a fixed cost (intercept) plus a cost per row (slope).
    mean_x = sum(by_size) / len(by_size)
    mean_y = sum(by_size.values()) / len(by_size)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in by_size.items()) / sum((x - mean_x) ** 2 for x in by_size)
    slope = max(slope, 0.0)  # no part gets cheaper with more rows: a falling line is noise in a fixed cost
    return max(mean_y + slope * (size - mean_x), 1e-3)


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
