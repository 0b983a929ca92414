"""The sample ledger: which packed rows each optimizer step trained on (``train.sample_ledger``).

Every rank notes each micro-batch it trains on: the step it belongs to, its epoch and index in the
epoch, and a hash of its tokens. At each checkpoint the notes are gathered to rank 0, which appends
them to one JSON-lines file next to Ray Train's run directory. A group restarted from a checkpoint
trains the steps after it again; their new lines supersede the old ones (each group start writes
under its own ``attempt``), so the file read back is the run as its model saw it: an audit that no
row was skipped or repeated across restarts and resizes.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any


def fingerprint(input_ids) -> str:
    """A micro-batch's identity: a hash of its token ids (int64, row after row)."""
    return hashlib.blake2b(input_ids.numpy().astype("int64").tobytes(), digest_size=8).hexdigest()


class SampleLedger:
    """One rank's notes since the last checkpoint; ``flush`` is a collective every rank joins."""

    def __init__(self, path: str | None, rank: int, world: int):
        self.path = Path(path) if path else None
        self.rank, self.world = rank, world
        self.attempt = uuid.uuid4().hex[:12]  # rank 0's, the one written
        self.pending: list[dict[str, Any]] = []

    def record(self, step: int, epoch: int, index: int, batch: dict[str, Any]) -> None:
        if self.path is not None:
            self.pending.append(
                {
                    "step": step,
                    "epoch": epoch,
                    "index": index,
                    "rank": self.rank,
                    "hash": fingerprint(batch["input_ids"]),
                }
            )

    def flush(self) -> None:
        if self.path is None:
            return
        import torch.distributed as dist

        gathered: list[list[dict[str, Any]]] = [self.pending]
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            gathered = [[] for _ in range(self.world)]
            dist.all_gather_object(gathered, self.pending)
        self.pending = []
        if self.rank != 0:
            return
        rows = sorted((row for rows in gathered for row in rows), key=lambda row: (row["step"], row["index"]))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            for row in rows:
                handle.write(json.dumps({**row, "world": self.world, "attempt": self.attempt}) + "\n")


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The micro-batches the final model trained on, step by step: for each step, the lines of the last group
    start that wrote it."""
    by_step: dict[int, list[dict[str, Any]]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        rows = by_step.setdefault(row["step"], [])
        if rows and rows[0]["attempt"] != row["attempt"]:
            rows.clear()
        rows.append(row)
    return [row for step in sorted(by_step) for row in by_step[step]]
