"""Readers: every source becomes rows of DOCUMENT_SCHEMA
{doc_id, source, source_id, metadata, text, reject_reason}.

A row that cannot become a document (invalid UTF-8, missing text field) is kept
with ``reject_reason`` set, so it is counted and written to ``rejects/``.
``source_id`` is the record's own id (``id_field``) or its location (path, and line
number or row index), and ``metadata`` the chosen fields as a JSON object: both ride
along through every step, so any kept or dropped document leads back to the corpus.
``doc_id`` is a hash of the location, never of the text: identical records are
distinct documents (and distinct nodes of the dedup graph).
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.data.config import DataConfig, SourceConfig
from pipelines.datasets import blocks_by_size

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
        reason = f"read: invalid utf-8 ({err.reason} at byte {err.start})"
        return [{"doc_id": _doc_id(path), "source": source, "source_id": path, "text": "", "reject_reason": reason}]
    docs = [{"doc_id": _doc_id(path), "source": source, "source_id": path, "text": text, "reject_reason": None}]
    try:
        docstring = ast.get_docstring(ast.parse(text))
    except (SyntaxError, ValueError):
        docstring = None  # Some stdlib files are deliberately invalid (test fixtures).
    if docstring:
        docs.append(
            {
                "doc_id": _doc_id(path, "docstring"),
                "source": source,
                "source_id": f"{path}#docstring",
                "text": docstring,
                "reject_reason": None,
            }
        )
    return docs


def _decode_binary(batch: dict[str, np.ndarray], source: str) -> pa.Table:
    """Whole files -> one document each; a file that is not UTF-8 text is one reject."""
    rows = []
    for path, payload in zip(batch["path"], batch["bytes"], strict=True):
        doc_id, location = _doc_id(str(path)), str(path)
        try:
            rows.append(_document(doc_id, location, bytes(payload).decode("utf-8")))
        except UnicodeDecodeError as err:
            rows.append(Record(doc_id, location, "", f"read: invalid utf-8 ({err.reason} at byte {err.start})"))
    return _documents(rows, source)


DOCUMENT_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("source_id", pa.string()),
        ("metadata", pa.string()),
        ("text", pa.string()),
        ("reject_reason", pa.string()),
    ]
)


@dataclass(frozen=True)
class Record:
    """One input record on its way to becoming a document row."""

    doc_id: str
    source_id: str
    text: str
    reject_reason: str | None = None
    metadata: str | None = None


def _documents(rows: list[Record], source: str) -> pa.Table:
    return pa.table(
        {
            "doc_id": [r.doc_id for r in rows],
            "source": [source] * len(rows),
            "source_id": [r.source_id for r in rows],
            "metadata": [r.metadata for r in rows],
            "text": [r.text for r in rows],
            "reject_reason": [r.reject_reason for r in rows],
        },
        schema=DOCUMENT_SCHEMA,
    )


def _storable(text: str) -> str | None:
    """Why ``text`` cannot be a document, or None. Arrow strings are UTF-8, and a JSON escape such
    as \\ud800 decodes to a lone surrogate that UTF-8 cannot hold: one such record must become one
    reject, not fail the whole write."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"read: text is not valid Unicode ({err.reason} at character {err.start})"
    if "\x00" in text:
        return f"read: text holds NUL characters (binary data?) at character {text.index(chr(0))}"
    return None


def _printable(value: Any) -> str:
    """Any value as a string Arrow can store (lone surrogates escaped)."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _document(doc_id: str, source_id: str, text: str, metadata: str | None = None) -> Record:
    """A record that reads as text; rejected with the reason when Arrow could not store that text."""
    reason = _storable(text)
    if reason is not None:
        return Record(doc_id, source_id, _printable(text)[:1000], reason, metadata)
    return Record(doc_id, source_id, text, None, metadata)


def _identity(record: dict[str, Any], spec: SourceConfig, location: str) -> tuple[str, str | None]:
    """(source_id, metadata JSON) of a record: its own id where it has one, else where it was read."""
    own = record.get(spec.id_field) if spec.id_field else None
    source_id = location if own is None else _printable(own)
    if not spec.metadata_fields:
        return source_id, None
    # ASCII escapes: any value (lone surrogates included) survives as an Arrow string.
    return source_id, json.dumps({f: record.get(f) for f in spec.metadata_fields}, default=str, sort_keys=True)


def _parse_record(record: Any, spec: SourceConfig, doc_id: str, location: str, raw: str) -> Record:
    if not isinstance(record, dict):
        return Record(doc_id, location, raw[:1000], f"read: a json line must be an object, got {type(record).__name__}")
    source_id, metadata = _identity(record, spec, location)
    text = record.get(spec.text_field)
    if text is None:
        return Record(
            doc_id, source_id, _printable(raw[:1000]), f"read: missing text field '{spec.text_field}'", metadata
        )
    if isinstance(text, bytes):  # a parquet binary column
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            return Record(doc_id, source_id, "", f"read: invalid utf-8 ({err.reason} at byte {err.start})", metadata)
    if not isinstance(text, str):
        reason = f"read: text field '{spec.text_field}' holds {type(text).__name__}, not a string"
        return Record(doc_id, source_id, _printable(text)[:1000], reason, metadata)
    return _document(doc_id, source_id, text, metadata)


def _parse_line(raw: bytes, spec: SourceConfig, path: str, number: int) -> Record:
    """One line of a jsonl or line-per-document text file."""
    doc_id, location = _doc_id(path, str(number)), f"{path}:{number}"
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Record(doc_id, location, "", f"read: invalid utf-8 ({err.reason} at byte {err.start})")
    if spec.format == "text":
        return _document(doc_id, location, line)
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return Record(
            doc_id, location, _printable(line[:1000]), f"read: malformed json ({err.msg} at column {err.colno})"
        )
    return _parse_record(record, spec, doc_id, location, line)


def _lines_to_documents(batch: dict[str, np.ndarray], spec: SourceConfig) -> pa.Table:
    """Whole files -> one document per non-blank line; a bad line is rejected, the rest kept.

    Ray's JSON and text readers decode a whole file strictly: one malformed line or
    invalid byte fails the file. Lines are parsed one by one here so only the bad
    line is lost, and it is kept in rejects with its reason.
    """
    rows = []
    for path, payload in zip(batch["path"], batch["bytes"], strict=True):
        for number, raw in enumerate(bytes(payload).split(b"\n"), start=1):
            if raw.strip():
                rows.append(_parse_line(raw.rstrip(b"\r"), spec, str(path), number))
    return _documents(rows, spec.name)


def _parquet_documents(batch: dict[str, np.ndarray], spec: SourceConfig):
    """Parquet files -> one document per row, ``doc_id`` from (path, row index).

    Read here rather than by ``ray.data.read_parquet``, whose rows carry their file but not their
    index in it: two identical records of one file would otherwise get one identity. One task per
    file, streaming one record batch at a time.
    """
    import fsspec
    import pyarrow.parquet as pq

    wanted = {spec.text_field, *(spec.metadata_fields), *([spec.id_field] if spec.id_field else [])}
    for path in batch["path"]:
        path = str(path)
        with fsspec.open(path, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            columns = [name for name in parquet.schema_arrow.names if name in wanted]
            row = 0
            for records in parquet.iter_batches(columns=columns, batch_size=4096):
                if spec.text_field in records.schema.names and pa.types.is_string(
                    records.schema.field(spec.text_field).type
                ):
                    # As bytes: a writer may have stored invalid UTF-8, which would fail the whole batch.
                    index = records.schema.get_field_index(spec.text_field)
                    records = records.set_column(index, spec.text_field, records.column(index).cast(pa.binary()))
                rows = []
                for record in records.to_pylist():
                    rows.append(_parse_record(record, spec, _doc_id(path, str(row)), f"{path}#{row}", ""))
                    row += 1
                yield _documents(rows, spec.name)


def _as_documents(table: pa.Table) -> pa.Table:
    for name in DOCUMENT_SCHEMA.names:  # readers without ids or metadata leave those columns out
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
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
        return ray.data.from_items(items, **blocks_by_size(files)).flat_map(_stdlib_documents)
    paths = [entry.path for entry in list_source(spec)]
    if spec.format == "parquet":
        files = ray.data.from_items([{"path": path} for path in paths])
        return files.map_batches(_parquet_documents, fn_kwargs={"spec": spec}, batch_size=1, batch_format="numpy")
    ds = ray.data.read_binary_files(paths, include_paths=True, **blocks_by_size(paths))
    if spec.format == "text" and spec.text_unit == "file":
        return ds.map_batches(_decode_binary, fn_kwargs={"source": spec.name}, batch_format="numpy")
    return ds.map_batches(_lines_to_documents, fn_kwargs={"spec": spec}, batch_format="numpy")


@dataclass(frozen=True)
class SourceFile:
    """One file of a source as listed: what Ray reads, and what says whether it changed."""

    path: str  # local path, or URI with its scheme (s3://, gs://, ...)
    size: int
    version: str  # ETag, generation or modification time, whichever the filesystem reports
    local: bool


class SourceNotFoundError(FileNotFoundError):
    pass


def _is_hidden(path: str) -> bool:
    # Markers and checksums that writers leave beside data files (_SUCCESS, .part-0.crc).
    return Path(path).name.startswith((".", "_"))


def list_source(spec: SourceConfig) -> list[SourceFile]:
    """The files a source names: a file, a folder (recursively) or a glob, local or any fsspec URI."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, root = fsspec.core.url_to_fs(spec.path)
    if glob.has_magic(root):
        paths = [p for p in fs.glob(root) if fs.isfile(p)]
    elif fs.isdir(root):
        paths = fs.find(root)
    elif fs.exists(root):
        paths = [root]
    else:
        paths = []
    paths = sorted(p for p in paths if not _is_hidden(p))
    if not paths:
        raise SourceNotFoundError(f"data source '{spec.name}': {spec.path} matches no file")
    local = isinstance(fs, LocalFileSystem)
    files = []
    for path in paths:
        info = fs.info(path)
        version = next(
            (
                str(info[k])
                for k in ("ETag", "etag", "generation", "md5Hash", "mtime", "LastModified", "updated", "created")
                if info.get(k)
            ),
            "",
        )
        files.append(
            SourceFile(path if local else fs.unstrip_protocol(path), int(info.get("size") or 0), version, local)
        )
    return files


#: Beside a run's manifest: the content digests of its local source files, by size and modification time.
SOURCES_CACHE = "sources-cache.json"


def source_fingerprint(config: DataConfig, cache: Path | None = None) -> str:
    """What the data stage reads, as one hash: local files by content, remote ones by their listing (path,
    size, ETag or modification time), the stdlib by the files it takes.

    With ``cache`` (a JSON file), a local file's content digest is reused while its size and modification
    time are those it was hashed at: checking a large corpus again lists it and reads only what changed (a
    touched file is re-read once and is still the same input).
    """
    known = _read_cache(cache)
    seen: dict[str, list] = {}
    digest = hashlib.sha256()
    for spec in config.sources:
        digest.update(f"{spec.format}:{spec.name}\0".encode())
        if spec.format == "stdlib":
            chosen = stdlib_files()
            chosen = chosen[: config.max_documents] if config.max_documents else chosen
            entries = [SourceFile(path, 0, "", True) for path in chosen]
        else:
            entries = list_source(spec)
        for entry in entries:
            identity = _local_identity(entry.path, known, seen) if entry.local else f"{entry.size}\0{entry.version}"
            digest.update(f"{entry.path}\0{identity}\0".encode())
    if cache is not None and seen != known:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(seen))
        os.replace(tmp, cache)
    return digest.hexdigest()[:16]


def _read_cache(cache: Path | None) -> dict[str, list]:
    if cache is None or not cache.is_file():
        return {}
    try:
        return json.loads(cache.read_text())
    except ValueError:
        return {}  # a cache cut short by a crash: hash again


def _local_identity(path: str, known: dict[str, list], seen: dict[str, list]) -> str:
    stat = os.stat(path)
    cached = known.get(path)
    if cached is not None and cached[:2] == [stat.st_size, stat.st_mtime_ns]:
        seen[path] = cached
        return cached[2]
    identity = _file_digest(path).hex()
    seen[path] = [stat.st_size, stat.st_mtime_ns, identity]
    return identity


def _file_digest(path: str) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.digest()


def read_documents(config: DataConfig):
    """All sources as one Dataset of DOCUMENT_SCHEMA rows, each source capped at ``max_documents``."""
    datasets = [read_source(spec, config.max_documents) for spec in config.sources]
    ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
    # One schema everywhere: a block whose reasons are all null must not become a null-typed column.
    return ds.map_batches(_as_documents, batch_format="pyarrow")
