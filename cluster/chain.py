"""How a stage runs in the chain: skip it when complete under the same key, else run it and record it.

A stage's key (Marin's executor's "version") is its own config (``Stage.sections``), the fingerprints
of what it reads (its sources: listed, and a local file's contents hashed once and reused while its size and
modification time stay the same; the artifacts of other stages it reads, e.g. the sweep's winner or the
trained model's hash) and the keys of its upstream stages. When a completed stage's key no longer
matches, the chain says what changed:

- its own config: refused until ``--force`` (an edit to an expensive stage's config should be deliberate);
- an input (a source, an upstream result or an upstream stage's key): the stage runs again, and so does
  everything downstream of it, naming the input.

A stage is never built on a stale upstream: that is refused, naming the upstream and what changed in it.
"""

from __future__ import annotations

import logging
from typing import Any

from cluster.recipe import LoomConfig, config_hash
from cluster.report import write_report
from cluster.stages import STAGES, chain_stages, tuned_train_config
from pipelines.runs import RunDir

__all__ = ["STAGES", "chain_stages", "run_chain", "run_stage", "stage_key", "tuned_train_config"]

log = logging.getLogger(__name__)


class StageConfigChangedError(RuntimeError):
    pass


def own_hash(name: str, cfg: LoomConfig) -> str:
    """Hash of the config sections this stage reads itself."""
    return config_hash(STAGES[name].own_config(cfg))


def upstream_of(name: str, cfg: LoomConfig) -> tuple[str, ...]:
    """The stages ``name`` reads from under this recipe (a disabled sweep is no input)."""
    enabled = chain_stages(cfg)
    return tuple(upstream for upstream in STAGES[name].upstream if upstream in enabled)


class Keys:
    """Keys and inputs of one recipe's stages against one run directory, each computed once (listing a
    large corpus is cheap, but not free)."""

    def __init__(self, cfg: LoomConfig, run: RunDir | None = None, running: str | None = None):
        self.cfg = cfg
        self.run = run or RunDir(cfg.run_dir())
        #: The stage about to run: its sources must be there; another's may be gone once it completed.
        self.running = running
        self._inputs: dict[str, dict[str, str]] = {}
        self._keys: dict[str, str] = {}

    def inputs(self, name: str) -> dict[str, str]:
        """What the stage reads from outside its own config: its sources' fingerprints and the fingerprints of
        the upstream artifacts it reads (``absent`` before they exist), by name."""
        if name not in self._inputs:
            stage = STAGES[name]
            upstream = upstream_of(name, self.cfg)
            found = dict(sorted(self._sources(name).items())) if stage.sources else {}
            for artifact in stage.reads:
                if artifact.stage in upstream and not artifact.by_key:
                    found[artifact.label()] = artifact.fingerprint(self.run) or "absent"
            self._inputs[name] = found
        return self._inputs[name]

    def _sources(self, name: str) -> dict[str, str]:
        """The stage's sources' fingerprints; for a completed upstream whose raw sources are gone (or out of reach),
        the ones it recorded, with a warning: a finished stage's outputs do not need its inputs any more."""
        try:
            return STAGES[name].sources(self.cfg)
        except Exception as error:  # a missing file, an unreachable store, refused credentials
            recorded = self.run.manifest()["stages"].get(name, {}).get("read", {})
            if name == self.running or not recorded or not self.run.is_complete(name):
                raise
            log.warning("stage %s: its sources cannot be listed (%s); using the fingerprints it recorded", name, error)
            return {label: value for label, value in recorded.items() if "." not in label}

    def upstream_keys(self, name: str) -> dict[str, str]:
        return {upstream: self.key(upstream) for upstream in upstream_of(name, self.cfg)}

    def key(self, name: str) -> str:
        """The stage's own hash chained with its inputs and its upstream stages' keys (recursively)."""
        if name not in self._keys:
            self._keys[name] = config_hash(
                {
                    "own": own_hash(name, self.cfg),
                    "inputs": self.inputs(name),
                    "upstream": self.upstream_keys(name),
                }
            )
        return self._keys[name]

    def changes(self, name: str) -> tuple[list[str], list[str]]:
        """What differs between the stage's completed record and now: (own config, inputs and upstream)."""
        record = self.run.manifest()["stages"].get(name, {})
        own = []
        if record.get("config_hash") not in (None, own_hash(name, self.cfg)):
            own.append(f"its own config changed ({record['config_hash']} -> {own_hash(name, self.cfg)})")
        inputs = []
        recorded_inputs = record.get("read", {})
        for label, fingerprint in self.inputs(name).items():
            if recorded_inputs.get(label) != fingerprint:
                inputs.append(f"input '{label}' changed ({recorded_inputs.get(label, 'absent')} -> {fingerprint})")
        for label in sorted(set(recorded_inputs) - set(self.inputs(name))):
            inputs.append(f"input '{label}' is no longer read")
        recorded = record.get("upstream", {})
        current = self.upstream_keys(name)
        for upstream, key in current.items():
            if recorded.get(upstream) != key:
                inputs.append(f"upstream stage '{upstream}' changed ({recorded.get(upstream)} -> {key})")
        for upstream in sorted(set(recorded) - set(current)):
            inputs.append(f"stage '{upstream}' is no longer upstream (switched off)")
        return own, inputs

    def what_changed(self, name: str) -> str:
        own, inputs = self.changes(name)
        return "; ".join(own + inputs) or "its key changed"


def stage_key(name: str, cfg: LoomConfig, run: RunDir | None = None) -> str:
    return Keys(cfg, run).key(name)


def upstream_keys(name: str, cfg: LoomConfig, run: RunDir | None = None) -> dict[str, str]:
    return Keys(cfg, run).upstream_keys(name)


def ancestors(name: str, cfg: LoomConfig) -> list[str]:
    """Every stage ``name`` builds on under this recipe, directly or through another, nearest first."""
    found: list[str] = []
    for upstream in upstream_of(name, cfg):
        for stage in (upstream, *ancestors(upstream, cfg)):
            if stage not in found:
                found.append(stage)
    return found


def _check_upstream(name: str, keys: Keys) -> None:
    """Refuse to build on a stage (direct or further up) whose completed key differs from its key now."""
    cfg, run = keys.cfg, keys.run
    for upstream in ancestors(name, cfg):
        done = run.completed_hash(upstream)
        if done is not None and done != keys.key(upstream) and not STAGES[upstream].always_runs:
            raise StageConfigChangedError(
                f"stage '{name}' of run '{cfg.run_name}' depends on stage '{upstream}', which completed under another "
                f"config or inputs ({keys.what_changed(upstream)}). Run '{upstream}' again first (`loom {upstream}`; "
                "--force when its own config changed), or pick another run_name."
            )


def run_stage(name: str, cfg: LoomConfig, force: bool = False) -> dict[str, Any] | None:
    """Run one stage unless it already completed under the same key; return its manifest record (None if skipped).

    A completed stage whose inputs changed runs again from scratch (its old outputs were built from what is no
    longer there); one whose own config changed is refused until ``force``.
    """
    stage = STAGES[name]
    run = RunDir(cfg.run_dir())
    if force:
        _check_upstream(name, Keys(cfg, run, running=name))  # before anything is removed
        run.reset(name)
    keys = Keys(cfg, run, running=name)
    done = run.completed_hash(name)
    if done is not None and not stage.always_runs:
        if done == keys.key(name):
            print(f"[loom] {name}: already complete in {run.stage_dir(name)} (skipped; --force redoes it)", flush=True)
            return None
        own, inputs = keys.changes(name)
        if own or not inputs:
            raise StageConfigChangedError(
                f"stage '{name}' of run '{cfg.run_name}' completed with key {done}, but the current config gives "
                f"{keys.key(name)}: {keys.what_changed(name)}. Rerun with --force, or pick another run_name."
            )
        _check_upstream(name, keys)  # before anything is removed: a refused stage keeps its outputs
        print(f"[loom] {name}: {'; '.join(inputs)}: running it again", flush=True)
        run.reset(name)
    _check_upstream(name, keys)
    print(f"[loom] {name}: running -> {run.stage_dir(name)}", flush=True)
    result = stage.run(cfg, run)
    record = run.complete(
        name,
        keys.key(name),
        result,
        config_hash=own_hash(name, cfg),
        upstream=keys.upstream_keys(name),
        read=keys.inputs(name),
    )
    write_report(run)
    print(f"[loom] {name}: done. metrics: {record['metrics']}", flush=True)
    return record


def run_chain(cfg: LoomConfig, force: bool = False) -> RunDir:
    """data -> tune -> train -> compress -> serve. Serve is left running; the caller decides when to stop it."""
    for name in chain_stages(cfg):
        run_stage(name, cfg, force=force)
    return RunDir(cfg.run_dir())
