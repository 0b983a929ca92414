"""The stages in order, and how one runs: skip when complete, else run and record it.

One dispatch table names each stage's function, the config it is hashed by and the stages
it reads from. A stage's key chains its own config hash with its upstream stages' keys, so
a change anywhere upstream changes every key below it: a completed downstream stage is
then refused, naming what changed, until ``--force`` redoes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cluster.recipe import LoomConfig, config_hash
from cluster.report import write_report
from pipelines.runs import RunDir, StageResult, hash_files
from pipelines.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSpec:
    run: Callable[[LoomConfig, RunDir], StageResult]
    hashed: Callable[[LoomConfig], dict[str, Any]]
    #: Stages whose outputs this one reads: their keys are part of its key.
    upstream: tuple[str, ...] = ()
    #: Services (serve) run every time; artifacts (data, train, tune) are skipped once complete.
    always_runs: bool = False


def _data(cfg: LoomConfig, run: RunDir) -> StageResult:
    from pipelines.data.stage import run_data

    return run_data(cfg.data, run, cfg.seed)


def tuned_train_config(cfg: LoomConfig, run: RunDir) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The training config the train stage runs: the recipe's, with the best trial's values when the
    sweep is on (and the record of where they came from)."""
    if not cfg.tune.enabled:
        return cfg.train, None
    from tune.config import apply_params
    from tune.stage import best_trial

    best = best_trial(run)
    train = TrainConfig.model_validate(apply_params(cfg.train.model_dump(), best["params"]))
    return train, {"params": best["params"], "trial_id": best["trial_id"], "val_loss": best["val_loss"]}


def _train(cfg: LoomConfig, run: RunDir) -> StageResult:
    from pipelines.train.stage import run_train

    train, tuned = tuned_train_config(cfg, run)
    result = run_train(train, run, cfg.seed)
    if tuned is not None:
        result.metrics["tuned"] = tuned
        result.inputs["tune_best"] = hash_files([run.stage_dir("tune") / "best.json"], root=run.stage_dir("tune"))
    return result


def _tune(cfg: LoomConfig, run: RunDir) -> StageResult:
    from tune.stage import run_tune

    return run_tune(cfg.tune, cfg.train, run, cfg.seed)


def _compress(cfg: LoomConfig, run: RunDir) -> StageResult:
    from tune.compress.stage import run_compress

    train, _ = tuned_train_config(cfg, run)  # students train as the model did (the sweep's values included)
    return run_compress(cfg.compress, train, run, cfg.seed)


def _serve(cfg: LoomConfig, run: RunDir) -> StageResult:
    from serve.stage import run_serve

    return run_serve(cfg.serve, run)


def _dump(*parts: Any) -> dict[str, Any]:
    return {
        str(i): part.model_dump(mode="json") if hasattr(part, "model_dump") else part for i, part in enumerate(parts)
    }


#: In chain order: the sweep decides the training run, so tune comes before train.
STAGES: dict[str, StageSpec] = {
    "data": StageSpec(_data, lambda c: _dump(c.data, c.seed)),
    "tune": StageSpec(_tune, lambda c: _dump(c.tune, c.train, c.seed), upstream=("data",)),
    # train reads tune's best trial while the sweep is on (upstream_of drops a disabled tune).
    "train": StageSpec(_train, lambda c: _dump(c.train, c.seed), upstream=("data", "tune")),
    "compress": StageSpec(_compress, lambda c: _dump(c.compress, c.seed), upstream=("data", "train")),
    # serve reads compress's variants when the sweep is on (a model may ask for one).
    "serve": StageSpec(_serve, lambda c: _dump(c.serve), upstream=("train", "compress"), always_runs=True),
}


class StageConfigChangedError(RuntimeError):
    pass


def own_hash(name: str, cfg: LoomConfig) -> str:
    """Hash of the config sections this stage reads itself."""
    return config_hash(STAGES[name].hashed(cfg))


def upstream_of(name: str, cfg: LoomConfig) -> tuple[str, ...]:
    """The stages ``name`` reads from under this recipe (a disabled sweep is no input)."""
    enabled = chain_stages(cfg)
    return tuple(upstream for upstream in STAGES[name].upstream if upstream in enabled)


def stage_key(name: str, cfg: LoomConfig) -> str:
    """The stage's own hash chained with its upstream stages' keys (recursively)."""
    upstream = {u: stage_key(u, cfg) for u in upstream_of(name, cfg)}
    return config_hash({"own": own_hash(name, cfg), "upstream": upstream})


def upstream_keys(name: str, cfg: LoomConfig) -> dict[str, str]:
    return {upstream: stage_key(upstream, cfg) for upstream in upstream_of(name, cfg)}


def _what_changed(name: str, cfg: LoomConfig, run: RunDir) -> str:
    """Which part of a completed stage's key differs now: its own config, or which upstream stage."""
    record = run.manifest()["stages"].get(name, {})
    changes = []
    if record.get("config_hash") not in (None, own_hash(name, cfg)):
        changes.append(f"its own config changed ({record['config_hash']} -> {own_hash(name, cfg)})")
    recorded = record.get("upstream", {})
    for upstream, key in upstream_keys(name, cfg).items():
        if recorded.get(upstream) != key:
            changes.append(f"upstream stage '{upstream}' changed ({recorded.get(upstream)} -> {key})")
    return "; ".join(changes) or "its key changed"


def ancestors(name: str, cfg: LoomConfig) -> list[str]:
    """Every stage ``name`` builds on under this recipe, directly or through another, nearest first."""
    found: list[str] = []
    for upstream in upstream_of(name, cfg):
        for stage in (upstream, *ancestors(upstream, cfg)):
            if stage not in found:
                found.append(stage)
    return found


def _check_upstream(name: str, cfg: LoomConfig, run: RunDir) -> None:
    """Refuse to build on a stage (direct or further up) that completed under another config than this recipe's."""
    for upstream in ancestors(name, cfg):
        done = run.completed_hash(upstream)
        if done is not None and done != stage_key(upstream, cfg) and not STAGES[upstream].always_runs:
            raise StageConfigChangedError(
                f"stage '{name}' of run '{cfg.run_name}' depends on stage '{upstream}', which completed under another "
                f"config ({_what_changed(upstream, cfg, run)}). Redo '{upstream}' with --force first, or pick "
                "another run_name."
            )


def run_stage(name: str, cfg: LoomConfig, force: bool = False) -> dict[str, Any] | None:
    """Run one stage unless it already completed; return its manifest record (None if skipped)."""
    spec = STAGES[name]
    run = RunDir(cfg.run_dir())
    key = stage_key(name, cfg)
    if force:
        run.reset(name)
    done = run.completed_hash(name)
    if done is not None and not spec.always_runs:
        if done != key:
            raise StageConfigChangedError(
                f"stage '{name}' of run '{cfg.run_name}' completed with key {done}, but the current config gives "
                f"{key}: {_what_changed(name, cfg, run)}. Rerun with --force, or pick another run_name."
            )
        print(f"[loom] {name}: already complete in {run.stage_dir(name)} (skipped; --force redoes it)", flush=True)
        return None
    _check_upstream(name, cfg, run)
    print(f"[loom] {name}: running -> {run.stage_dir(name)}", flush=True)
    result = spec.run(cfg, run)
    record = run.complete(name, key, result, config_hash=own_hash(name, cfg), upstream=upstream_keys(name, cfg))
    write_report(run)
    print(f"[loom] {name}: done. metrics: {record['metrics']}", flush=True)
    return record


def chain_stages(cfg: LoomConfig) -> list[str]:
    """The stages this recipe runs, in order: the sweeps only when enabled."""
    switches = {"tune": cfg.tune.enabled, "compress": cfg.compress.enabled}
    return [name for name in STAGES if switches.get(name, True)]


def run_chain(cfg: LoomConfig, force: bool = False) -> RunDir:
    """data -> tune -> train -> compress -> serve. Serve is left running; the caller decides when to stop it."""
    for name in chain_stages(cfg):
        run_stage(name, cfg, force=force)
    return RunDir(cfg.run_dir())
