"""One progress line per stage: the terminal shows where a long stage is, not every library's log."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
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
