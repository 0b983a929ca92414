"""Readers: every source becomes rows of {doc_id, source, text, reject_reason}.

A row that cannot become a document (invalid UTF-8, missing text field) is kept
with ``reject_reason`` set, so it is counted and written to ``rejects/``.
"""

from __future__ import annotations

import ast
import hashlib
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
    return hashlib.sha1("\0".join(parts).encode()).hexdigest()[:20]


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


def _records_to_documents(table: pa.Table, spec: SourceConfig) -> pa.Table:
    n = table.num_rows
    paths = table.column("path").to_pylist() if "path" in table.column_names else [spec.path] * n
    if spec.text_field in table.column_names:
        texts = table.column(spec.text_field).to_pylist()
    else:
        texts = [None] * n
    doc_ids, out_texts, reasons = [], [], []
    for i, (path, text) in enumerate(zip(paths, texts, strict=True)):
        doc_ids.append(_doc_id(str(path), str(i), str(text)[:256]))
        if not isinstance(text, str):
            out_texts.append("")
            reasons.append(f"read: missing text field '{spec.text_field}'")
        else:
            out_texts.append(text)
            reasons.append(None)
    return pa.table(
        {
            "doc_id": pa.array(doc_ids, pa.string()),
            "source": pa.array([spec.name] * n, pa.string()),
            "text": pa.array(out_texts, pa.string()),
            "reject_reason": pa.array(reasons, pa.string()),
        }
    )


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
    if spec.format == "text":
        ds = ray.data.read_text(spec.path, include_paths=True).rename_columns({"text": spec.text_field})
    elif spec.format == "jsonl":
        ds = ray.data.read_json(spec.path, lines=True, include_paths=True)
    else:
        ds = ray.data.read_parquet(spec.path, include_paths=True)
    return ds.map_batches(_records_to_documents, fn_kwargs={"spec": spec}, batch_format="pyarrow")


def read_documents(config: DataConfig):
    """All sources as one Dataset, each capped at ``max_documents`` when set."""
    datasets = [read_source(spec, config.max_documents) for spec in config.sources]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
