"""Readers: every source becomes rows of {doc_id, source, text, reject_reason}.

A row that cannot become a document (invalid UTF-8, missing text field) is kept
with ``reject_reason`` set, so it is counted and written to ``rejects/``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.data.config import DataConfig, SourceConfig

SKIP_STDLIB_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "lib2to3"}


def stdlib_files() -> list[str]:
    """Python sources of the running interpreter's standard library, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        str(path) for path in root.rglob("*.py") if not SKIP_STDLIB_DIRS.intersection(path.relative_to(root).parts)
    ]
    return sorted(files)


def _doc_id(*parts: str) -> str:
    # 16 hex digits: near-dedup reads a doc_id as an unsigned 64-bit graph node.
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:16]


def _stdlib_documents(row: dict[str, Any]) -> list[dict[str, Any]]:
    path = row["path"]
    source = row["source"]
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return [
            {
                "doc_id": _doc_id(path),
                "source": source,
                "text": "",
                "reject_reason": f"read: invalid utf-8 ({err.reason} at byte {err.start})",
            }
        ]
    docs = [{"doc_id": _doc_id(path), "source": source, "text": text, "reject_reason": None}]
    try:
        docstring = ast.get_docstring(ast.parse(text))
    except (SyntaxError, ValueError):
        docstring = None  # Some stdlib files are deliberately invalid (test fixtures).
    if docstring:
        docs.append({"doc_id": _doc_id(path, "docstring"), "source": source, "text": docstring, "reject_reason": None})
    return docs


def _decode_binary(batch: dict[str, np.ndarray], source: str) -> dict[str, list]:
    out: dict[str, list] = {"doc_id": [], "source": [], "text": [], "reject_reason": []}
    for path, payload in zip(batch["path"], batch["bytes"], strict=True):
        out["doc_id"].append(_doc_id(str(path)))
        out["source"].append(source)
        try:
            out["text"].append(bytes(payload).decode("utf-8"))
            out["reject_reason"].append(None)
        except UnicodeDecodeError as err:
            out["text"].append("")
            out["reject_reason"].append(f"read: invalid utf-8 ({err.reason} at byte {err.start})")
    return out


DOCUMENT_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("source", pa.string()), ("text", pa.string()), ("reject_reason", pa.string())]
)


def _documents(rows: list[tuple[str, str, str | None]], source: str) -> pa.Table:
    """Rows of (doc_id, text, reject_reason) as a table of DOCUMENT_SCHEMA."""
    return pa.table(
        {
            "doc_id": [r[0] for r in rows],
            "source": [source] * len(rows),
            "text": [r[1] for r in rows],
            "reject_reason": [r[2] for r in rows],
        },
        schema=DOCUMENT_SCHEMA,
    )


def _parse_line(raw: bytes, spec: SourceConfig) -> tuple[str, str | None]:
    """(text, reject_reason) of one line of a jsonl or line-per-document text file."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return "", f"read: invalid utf-8 ({err.reason} at byte {err.start})"
    if spec.format == "text":
        return line, None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return line[:1000], f"read: malformed json ({err.msg} at column {err.colno})"
    if not isinstance(record, dict):
        return line[:1000], f"read: a json line must be an object, got {type(record).__name__}"
    text = record.get(spec.text_field)
    if not isinstance(text, str):
        return line[:1000], f"read: missing text field '{spec.text_field}'"
    return text, None


def _lines_to_documents(batch: dict[str, np.ndarray], spec: SourceConfig) -> pa.Table:
    """Whole files -> one document per non-blank line; a bad line is rejected, the rest kept.

    Ray's JSON and text readers decode a whole file strictly: one malformed line or
    invalid byte fails the file. Lines are parsed one by one here so only the bad
    line is lost, and it is kept in rejects with its reason.
    """
    rows = []
    for path, payload in zip(batch["path"], batch["bytes"], strict=True):
        for number, raw in enumerate(bytes(payload).split(b"\n"), start=1):
            if not raw.strip():
                continue
            text, reason = _parse_line(raw.rstrip(b"\r"), spec)
            rows.append((_doc_id(str(path), str(number)), text, reason))
    return _documents(rows, spec.name)


def _records_to_documents(table: pa.Table, spec: SourceConfig) -> pa.Table:
    n = table.num_rows
    paths = table.column("path").to_pylist() if "path" in table.column_names else [spec.path] * n
    texts = table.column(spec.text_field).to_pylist() if spec.text_field in table.column_names else [None] * n
    rows = []
    for path, text in zip(paths, texts, strict=True):
        if isinstance(text, str):
            rows.append((_doc_id(str(path), text), text, None))
        else:
            rows.append((_doc_id(str(path), repr(text)), "", f"read: missing text field '{spec.text_field}'"))
    return _documents(rows, spec.name)


def _as_documents(table: pa.Table) -> pa.Table:
    return table.select(DOCUMENT_SCHEMA.names).cast(DOCUMENT_SCHEMA)


def read_source(spec: SourceConfig, max_documents: int | None = None):
    """One source as a Ray Dataset of documents, at most ``max_documents`` of them."""
    ds = _read_source(spec, max_documents)
    return ds.limit(max_documents) if max_documents else ds


def _read_source(spec: SourceConfig, max_documents: int | None):
    import ray.data

    if spec.format == "stdlib":
        files = stdlib_files()
        if max_documents:
            files = files[:max_documents]
        items = [{"path": path, "source": spec.name} for path in files]
        return ray.data.from_items(items).flat_map(_stdlib_documents)
    if spec.format == "text" and spec.text_unit == "file":
        ds = ray.data.read_binary_files(spec.path, include_paths=True)
        return ds.map_batches(_decode_binary, fn_kwargs={"source": spec.name}, batch_format="numpy")
    if spec.format in ("jsonl", "text"):
        ds = ray.data.read_binary_files(spec.path, include_paths=True)
        return ds.map_batches(_lines_to_documents, fn_kwargs={"spec": spec}, batch_format="numpy")
    ds = ray.data.read_parquet(spec.path, include_paths=True)
    return ds.map_batches(_records_to_documents, fn_kwargs={"spec": spec}, batch_format="pyarrow")


def read_documents(config: DataConfig):
    """All sources as one Dataset of DOCUMENT_SCHEMA rows, each source capped at ``max_documents``."""
    datasets = [read_source(spec, config.max_documents) for spec in config.sources]
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    # One schema everywhere: a block whose reasons are all null must not become a null-typed column.
    return ds.map_batches(_as_documents, batch_format="pyarrow")
