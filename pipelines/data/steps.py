"""Data steps: small classes, each turning one Ray Dataset into the next.

Every row carries ``reject_reason``: null while the document is kept. A step
never deletes a row; it marks it, so the stage can count every drop and route
it to ``rejects/`` with the step's name and the reason.

A filter only says ``keep(row) -> True | (False, reason)``; the base class does
the marking. Rows dropped upstream pass through later steps untouched (the
first reason wins).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Literal

import pyarrow as pa

_TRAILING_SPACE = re.compile(r"[ \t]+\n")

Verdict = bool | tuple[bool, str]


def with_columns(table: pa.Table, **columns: list | pa.Array) -> pa.Table:
    """Set or append string columns on an Arrow table."""
    for name, values in columns.items():
        array = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values, pa.string())
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, array)
        else:
            table = table.append_column(name, array)
    return table


def reason_key(reason: str) -> str:
    """The countable part of a reject reason: "step: code (detail)" -> "step: code"."""
    return reason.split(" (", 1)[0]


class Step:
    """One transformation of the document dataset (rows: doc_id, source, text, reject_reason)."""

    name = "step"

    def apply(self, ds):
        raise NotImplementedError

    def stats(self) -> dict[str, Any]:
        """What the step found beyond its drops (e.g. duplicate clusters), for stats.json."""
        return {}


class Normalize(Step):
    """Unicode normal form, Unix newlines, no trailing spaces, no surrounding blank lines."""

    name = "normalize"

    def __init__(self, form: Literal["NFC", "NFKC"] = "NFC"):
        self.form = form

    def normalize(self, text: str) -> str:
        text = unicodedata.normalize(self.form, text).replace("\r\n", "\n").replace("\r", "\n")
        return _TRAILING_SPACE.sub("\n", text).strip()

    def _batch(self, table: pa.Table) -> pa.Table:
        texts = table.column("text").to_pylist()
        return with_columns(table, text=[self.normalize(t) for t in texts])

    def apply(self, ds):
        return ds.map_batches(self._batch, batch_format="pyarrow")


class Filter(Step):
    """Keep or drop each document; subclasses implement ``keep`` only.

    ``keep`` returns True, or ``(False, reason)`` where reason reads "code (detail)":
    the code is what stats count, the detail says why this document failed.
    """

    def keep(self, row: dict[str, Any]) -> Verdict:
        raise NotImplementedError

    def keep_batch(self, rows: list[dict[str, Any]]) -> list[Verdict]:
        """``keep`` for each row; a filter whose check vectorises across documents overrides this."""
        return [self.keep(row) for row in rows]

    def _batch(self, table: pa.Table) -> pa.Table:
        reasons = table.column("reject_reason").to_pylist()
        # Rows already dropped upstream are not judged again: the first reason wins.
        open_rows = [i for i, reason in enumerate(reasons) if reason is None]
        if len(open_rows) < len(reasons):
            rows = table.take(pa.array(open_rows, pa.int64())).to_pylist()
        else:
            rows = table.to_pylist()
        for i, verdict in zip(open_rows, self.keep_batch(rows), strict=True):
            if verdict is True:
                continue
            reason = verdict[1] if isinstance(verdict, tuple) else "dropped"
            reasons[i] = f"{self.name}: {reason}"
        return with_columns(table, reject_reason=reasons)

    def apply(self, ds):
        return ds.map_batches(self._batch, batch_format="pyarrow")


def split_kept(ds, materialize: bool = True):
    """(kept, rejected) halves of a marked dataset; materialised once (by default) so both reuse it."""
    from ray.data.expressions import col

    ds = ds.materialize() if materialize else ds
    return ds.filter(expr=col("reject_reason").is_null()), ds.filter(expr=col("reject_reason").is_not_null())
