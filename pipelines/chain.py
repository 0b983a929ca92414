"""The stages in order, and how one runs: skip when complete, else run and record it.

One dispatch table names each stage's function and the config it is hashed by;
a stage receives only its own section (plus the seed and the run directory).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.config import LoomConfig, config_hash
from pipelines.runs import RunDir, StageResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    run: Callable[[LoomConfig, RunDir], StageResult]
    hashed: Callable[[LoomConfig], dict[str, Any]]
    #: Services (serve) run every time; artifacts (data, train, tune) are skipped once complete.
    always_runs: bool = False


def _data(cfg: LoomConfig, run: RunDir) -> StageResult:
    from pipelines.data.stage import run_data

    return run_data(cfg.data, run, cfg.seed)


def _train(cfg: LoomConfig, run: RunDir) -> StageResult:
    from pipelines.train.stage import run_train

    return run_train(cfg.train, run, cfg.seed)


def _tune(cfg: LoomConfig, run: RunDir) -> StageResult:
    from tune.stage import run_tune

    return run_tune(cfg.tune, cfg.train, run, cfg.seed)


def _serve(cfg: LoomConfig, run: RunDir) -> StageResult:
    from serve.stage import run_serve

    return run_serve(cfg.serve, run)


def _dump(*parts: Any) -> dict[str, Any]:
    return {
        str(i): part.model_dump(mode="json") if hasattr(part, "model_dump") else part for i, part in enumerate(parts)
    }


STAGES: dict[str, StageSpec] = {
    "data": StageSpec(_data, lambda c: _dump(c.data, c.seed)),
    "train": StageSpec(_train, lambda c: _dump(c.train, c.seed)),
    "tune": StageSpec(_tune, lambda c: _dump(c.tune, c.train, c.seed)),
    "serve": StageSpec(_serve, lambda c: _dump(c.serve), always_runs=True),
}


class StageConfigChangedError(RuntimeError):
    pass


def run_stage(name: str, cfg: LoomConfig, force: bool = False) -> dict[str, Any] | None:
    """Run one stage unless it already completed; return its manifest record (None if skipped)."""
    spec = STAGES[name]
    run = RunDir(cfg.run_dir())
    digest = config_hash(spec.hashed(cfg))
    if force:
        run.reset(name)
    done = run.completed_hash(name)
    if done is not None and not spec.always_runs:
        if done != digest:
            raise StageConfigChangedError(
                f"stage '{name}' of run '{cfg.run_name}' completed with config hash {done}, but the current "
                f"config hashes to {digest}. Rerun with --force, or pick another run_name."
            )
        print(f"[loom] {name}: already complete in {run.stage_dir(name)} (skipped; --force redoes it)", flush=True)
        return None
    print(f"[loom] {name}: running -> {run.stage_dir(name)}", flush=True)
    result = spec.run(cfg, run)
    record = run.complete(name, digest, result)
    print(f"[loom] {name}: done. metrics: {record['metrics']}", flush=True)
    return record


def chain_stages(cfg: LoomConfig) -> list[str]:
    return [name for name in STAGES if name != "tune" or cfg.tune.enabled]


def run_chain(cfg: LoomConfig, force: bool = False) -> RunDir:
    """data -> train -> tune -> serve. Serve is left running; the caller decides when to stop it."""
    for name in chain_stages(cfg):
        run_stage(name, cfg, force=force)
    return RunDir(cfg.run_dir())
