"""Run directories: completion markers, manifest lineage, reset."""

from __future__ import annotations

import json

from pipelines.runs import RunDir, StageResult, hash_dir


def test_complete_records_lineage_and_marker(tmp_path):
    run = RunDir(tmp_path / "r")
    out = run.begin("data")
    (out / "shard.parquet").write_bytes(b"abc")
    assert not run.is_complete("data")
    run.complete("data", "hash1", StageResult(outputs={"train": str(out)}, metrics={"docs": 3}, inputs={"src": "x"}))
    assert run.is_complete("data") and run.completed_hash("data") == "hash1"
    manifest = json.loads(run.manifest_path.read_text())
    record = manifest["stages"]["data"]
    assert record["config_hash"] == "hash1" and record["metrics"] == {"docs": 3} and record["inputs"] == {"src": "x"}
    assert {"ray", "torch", "deepspeed", "transformers"} <= set(record["packages"])


def test_reset_forgets_outputs_and_manifest_entry(tmp_path):
    run = RunDir(tmp_path / "r")
    run.begin("train")
    run.complete("train", "h", StageResult())
    run.reset("train")
    assert not run.is_complete("train")
    assert "train" not in run.manifest()["stages"]


def test_hash_dir_depends_on_content_and_names(tmp_path):
    (tmp_path / "a").write_text("1")
    first = hash_dir(tmp_path)
    (tmp_path / "a").write_text("2")
    assert hash_dir(tmp_path) != first
