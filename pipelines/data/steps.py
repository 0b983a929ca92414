"""Data steps: small classes, each turning one Ray Dataset into the next.

A filter only says ``keep(row) -> True | (False, reason)``; the base class marks
dropped rows with ``reject_reason`` (prefixed by the step name) so the stage can
count them and route them to ``rejects/`` instead of losing them.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Any

import pyarrow as pa

_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_WHITESPACE = re.compile(r"\s+")


def _batch_rows(table: pa.Table) -> tuple[list[str], list[str | None]]:
    return table.column("text").to_pylist(), table.column("reject_reason").to_pylist()


def _with_columns(table: pa.Table, **columns: list) -> pa.Table:
    for name, values in columns.items():
        array = pa.array(values, pa.string())
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    return table


class Step:
    """One transformation of the document dataset."""

    name = "step"

    def apply(self, ds):
        raise NotImplementedError


class Normalize(Step):
    """Unicode NFC, Unix newlines, no trailing spaces, no surrounding blank lines."""

    name = "normalize"

    @staticmethod
    def normalize(text: str) -> str:
        text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
        return _TRAILING_SPACE.sub("\n", text).strip()

    def _batch(self, table: pa.Table) -> pa.Table:
        texts, _ = _batch_rows(table)
        return _with_columns(table, text=[self.normalize(t) for t in texts])

    def apply(self, ds):
        return ds.map_batches(self._batch, batch_format="pyarrow")


class Filter(Step):
    """Keep or drop each document; subclasses implement ``keep`` only."""

    def keep(self, row: dict[str, Any]) -> bool | tuple[bool, str]:
        raise NotImplementedError

    def _batch(self, table: pa.Table) -> pa.Table:
        reasons = table.column("reject_reason").to_pylist()
        for i, row in enumerate(table.to_pylist()):
            if reasons[i] is not None:
                continue  # Already dropped upstream; keep the first reason.
            verdict = self.keep(row)
            if verdict is True:
                continue
            reason = verdict[1] if isinstance(verdict, tuple) else "dropped"
            reasons[i] = f"{self.name}: {reason}"
        return _with_columns(table, reject_reason=reasons)

    def apply(self, ds):
        return ds.map_batches(self._batch, batch_format="pyarrow")


class MinLengthFilter(Filter):
    name = "min_length"

    def __init__(self, min_chars: int):
        self.min_chars = min_chars

    def keep(self, row: dict[str, Any]) -> bool | tuple[bool, str]:
        length = len(row["text"])
        if length < self.min_chars:
            return False, f"{length} chars < {self.min_chars}"
        return True


def content_hash(text: str) -> str:
    """Hash of the text with case and whitespace runs folded: the exact-duplicate key."""
    return hashlib.sha256(_WHITESPACE.sub(" ", text.lower()).encode()).hexdigest()


class ExactDedup(Step):
    """Keep one document per content hash: the one with the smallest doc_id (deterministic)."""

    name = "exact_dedup"

    def __init__(self, num_partitions: int = 8):
        # Ray's default (200 hash partitions) costs minutes of task overhead on small corpora.
        self.num_partitions = num_partitions

    def _hash(self, table: pa.Table) -> pa.Table:
        texts, _ = _batch_rows(table)
        return _with_columns(table, content_hash=[content_hash(t) for t in texts])

    @staticmethod
    def _mark(group: pa.Table) -> pa.Table:
        group = group.sort_by("doc_id")
        keeper = group.column("doc_id")[0].as_py()
        reasons = [None] + [f"exact_dedup: duplicate of {keeper}"] * (group.num_rows - 1)
        return _with_columns(group, reject_reason=reasons)

    def apply(self, ds):
        hashed = ds.map_batches(self._hash, batch_format="pyarrow")
        return hashed.groupby("content_hash", num_partitions=self.num_partitions).map_groups(
            self._mark, batch_format="pyarrow"
        )
