"""Readers without Ray: record identity, row-level rejects, and source listings for the data lineage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.config import DataConfig, SourceConfig
from pipelines.data.readers import (
    SourceNotFoundError,
    _lines_to_documents,
    _parquet_documents,
    list_source,
    source_fingerprint,
)


def test_jsonl_lines_keep_their_own_id_and_metadata(tmp_path):
    spec = SourceConfig(format="jsonl", path=str(tmp_path), name="j", id_field="id", metadata_fields=["lang"])
    payload = b"\n".join(
        [json.dumps({"id": "a1", "text": "one", "lang": "en"}).encode(), b"{broken", json.dumps({"text": "x"}).encode()]
    )
    table = _lines_to_documents({"path": np.array(["f.jsonl"]), "bytes": np.array([payload], dtype=object)}, spec)
    rows = table.to_pylist()
    assert [r["source_id"] for r in rows] == ["a1", "f.jsonl:2", "f.jsonl:3"]  # no id: the location
    assert json.loads(rows[0]["metadata"]) == {"lang": "en"} and rows[0]["reject_reason"] is None
    assert rows[1]["reject_reason"].startswith("read: malformed json")
    assert len({r["doc_id"] for r in rows}) == 3


def test_identical_parquet_records_are_distinct_documents(tmp_path):
    path = tmp_path / "twins.parquet"
    pq.write_table(pa.table({"text": ["same text"] * 3, "n": [1, 2, 3]}), path, row_group_size=2)
    spec = SourceConfig(format="parquet", path=str(path), name="p", metadata_fields=["n"])
    tables = list(_parquet_documents({"path": np.array([str(path)])}, spec))
    rows = pa.concat_tables(tables).to_pylist()
    assert [r["source_id"] for r in rows] == [f"{path}#0", f"{path}#1", f"{path}#2"]  # across row groups
    assert len({r["doc_id"] for r in rows}) == 3
    assert [json.loads(r["metadata"])["n"] for r in rows] == [1, 2, 3]


def test_id_and_metadata_need_records():
    with pytest.raises(ValueError, match="need records"):
        SourceConfig(format="text", path="x", id_field="id")
    with pytest.raises(ValueError, match="cannot also be"):
        SourceConfig(format="jsonl", path="x", metadata_fields=["text"])


def test_globs_are_listed_and_hidden_files_skipped(tmp_path):
    for name in ("a.jsonl.gz", "b.jsonl.gz", "c.txt", "_SUCCESS"):
        (tmp_path / name).write_bytes(b"x")
    files = list_source(SourceConfig(format="jsonl", path=str(tmp_path / "*.jsonl.gz"), name="g"))
    assert [f.path for f in files] == [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b.jsonl.gz")]
    assert [f.path for f in list_source(SourceConfig(format="text", path=str(tmp_path), name="d"))] == [
        str(tmp_path / n) for n in ("a.jsonl.gz", "b.jsonl.gz", "c.txt")
    ]
    with pytest.raises(SourceNotFoundError, match="matches no file"):
        list_source(SourceConfig(format="jsonl", path=str(tmp_path / "*.parquet"), name="none"))


def test_local_glob_contributes_contents_to_the_input_hash(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n')
    config = DataConfig(sources=[SourceConfig(format="jsonl", path=str(tmp_path / "*.jsonl"), name="g")])
    first = source_fingerprint(config)
    assert source_fingerprint(config) == first
    (tmp_path / "b.jsonl").write_text('{"text": "two"}\n')  # a new file matches the glob
    second = source_fingerprint(config)
    (tmp_path / "b.jsonl").write_text('{"text": "TWO"}\n')  # same size, other content
    assert len({first, second, source_fingerprint(config)}) == 3


def test_remote_uri_contributes_its_listing_to_the_input_hash():
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/corpus/code/part-0.jsonl", b'{"text": "a"}\n')
    memory.pipe("/corpus/code/part-1.jsonl", b'{"text": "b"}\n')
    config = DataConfig(sources=[SourceConfig(format="jsonl", path="memory://corpus/code/*.jsonl", name="code")])
    try:
        files = list_source(config.sources[0])
        assert [f.path for f in files] == [memory.unstrip_protocol(f"/corpus/code/part-{i}.jsonl") for i in (0, 1)]
        assert not files[0].local and files[0].size == 14 and files[0].version
        first = source_fingerprint(config)
        memory.pipe("/corpus/code/part-1.jsonl", b'{"text": "bigger"}\n')  # another size and time
        second = source_fingerprint(config)
        memory.pipe("/corpus/code/part-2.jsonl", b'{"text": "c"}\n')  # a new object under the glob
        assert len({first, second, source_fingerprint(config)}) == 3
    finally:
        memory.rm("/corpus", recursive=True)


def test_every_row_level_failure_is_one_reject_with_its_reason():
    spec = SourceConfig(format="jsonl", path="x", name="j", id_field="id")
    lines = [
        b'{"id": 1, "text": "fine"}',
        b'{"id": 2, "text": "lone surrogate \\ud83d here"}',  # valid JSON, not storable Unicode
        b'{"id": 3, "text": "nul \\u0000 inside"}',
        b'{"id": 4, "text": 42}',
        b'{"id": 5, "body": "no text"}',
        b'{"id": "\\udc00", "text": "an id Arrow cannot store as is"}',
        b'{"id": 7, "text": "bad byte \xff"}',
        b"{truncated",
        b"[1, 2]",
    ]
    table = _lines_to_documents(
        {"path": np.array(["f.jsonl"]), "bytes": np.array([b"\n".join(lines)], dtype=object)}, spec
    )
    reasons = [r["reject_reason"] for r in table.to_pylist()]  # the table exists: Arrow stored every row
    assert reasons[0] is None and reasons[5] is None
    assert reasons[1].startswith("read: text is not valid Unicode (surrogates not allowed")
    assert reasons[2].startswith("read: text holds NUL characters")
    assert reasons[3] == "read: text field 'text' holds int, not a string"
    assert reasons[4] == "read: missing text field 'text'"
    assert reasons[6].startswith("read: invalid utf-8")
    assert reasons[7].startswith("read: malformed json") and reasons[8].startswith("read: a json line must be")
    assert table.column("source_id").to_pylist()[5] == "\\udc00"


def test_text_files_and_parquet_rows_fail_one_at_a_time(tmp_path):
    from pipelines.data.readers import _decode_binary

    files = {
        "path": np.array(["a.txt", "b.txt", "c.txt"]),
        "bytes": np.array([b"ok", b"\x00\x01bin", b"\xfe"], dtype=object),
    }
    reasons = _decode_binary(files, "t").column("reject_reason").to_pylist()
    assert (
        reasons[0] is None and reasons[1].startswith("read: text holds NUL") and reasons[2].startswith("read: invalid")
    )

    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"text": pa.array([b"good text", b"\xff\xfe", b"a\x00b"], pa.binary())}), path)
    rows = pa.concat_tables(
        _parquet_documents({"path": np.array([str(path)])}, SourceConfig(format="parquet", path=str(path)))
    ).to_pylist()
    assert [r["reject_reason"] is None for r in rows] == [True, False, False]
    assert rows[0]["text"] == "good text" and rows[1]["reject_reason"].startswith("read: invalid utf-8")


def test_a_small_input_is_read_in_blocks_of_rays_minimum_size_and_a_large_or_remote_one_as_ray_plans_it(
    tmp_path, monkeypatch
):
    import ray
    import ray.data

    from pipelines.datasets import blocks_by_size

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # no cluster: one CPU, so Ray's floor is two blocks
    minimum = ray.data.DataContext.get_current().target_min_block_size
    small = [tmp_path / name for name in ("a.parquet", "b.parquet", "c.parquet")]
    for path in small:
        path.write_bytes(b"x" * (minimum // 4))
    assert blocks_by_size([str(path) for path in small]) == {
        "override_num_blocks": 2
    }  # under one minimum block: still two, for two cores
    (tmp_path / "c.parquet").write_bytes(b"x" * (3 * minimum // 2))
    assert blocks_by_size([str(path) for path in small]) == {}  # 2 MiB: Ray's floor no longer cuts below 1 MiB
    assert blocks_by_size([str(small[0]), "s3://bucket/corpus.parquet"]) == {}  # not a local file: Ray plans it
