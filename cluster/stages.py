"""The stage registry: every stage once, in chain order, with what it reads and how it runs.

The chain's order, the CLI's stage commands, ``loom submit``'s entrypoints, the run report's sections and
the recipe's stage checks are all derived from ``STAGES``; nothing else lists the stages.

A stage declares here, in one place, what its key is made of: the recipe sections it is configured by
(``sections``), what it reads from outside the run (``sources``: listed, with local contents hashed once per
size and modification time), and the
artifacts of other stages it reads (``reads``, typed in ``pipelines.artifacts``). Its upstream stages are
the producers of those artifacts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipelines.artifacts import Artifact, CompressionFront, DataOutputs, EvalResults, TrainedModel, TuneBest
from pipelines.runs import RunDir, StageResult

if TYPE_CHECKING:
    from cluster.recipe import LoomConfig
    from pipelines.train.config import TrainConfig


@dataclass(frozen=True)
class Stage:
    name: str
    #: One line: the CLI's help and the report's heading.
    summary: str
    #: ``python -m MODULE --config RECIPE ...`` runs the stage alone (the entrypoint of its Ray job).
    module: str
    #: The stage's work, given the whole recipe (it passes each function only its own section).
    run: Callable[[LoomConfig, RunDir], StageResult]
    #: Recipe sections (dotted attributes of LoomConfig) whose values are this stage's own config.
    sections: tuple[str, ...]
    #: Sections that configure this stage only while a recipe value is set: (section, dotted value).
    sections_while: tuple[tuple[str, str], ...] = ()
    #: Artifacts of other stages this one reads; their producers are its upstream stages.
    reads: tuple[type[Artifact], ...] = ()
    #: What it reads from outside the run, by name: a fingerprint of each (listings; a local file's content hash is
    #: cached by size and modification time, so checking again reads only what changed).
    sources: Callable[[LoomConfig], dict[str, str]] | None = None
    #: The recipe switch that turns the stage on (``tune.enabled``); None: always part of the chain.
    switch: str | None = None
    #: Services (serve) run every time; artifacts are skipped once complete.
    always_runs: bool = False

    @property
    def upstream(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(artifact.stage for artifact in self.reads))

    def enabled(self, cfg: LoomConfig) -> bool:
        return self.switch is None or bool(_attribute(cfg, self.switch))

    def own_config(self, cfg: LoomConfig) -> dict[str, Any]:
        sections = [*self.sections, *(s for s, value in self.sections_while if _attribute(cfg, value) is not None)]
        return {section: _dump(_attribute(cfg, section)) for section in sections}


def _attribute(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def tuned_train_config(cfg: LoomConfig, run: RunDir) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The training config the train stage runs: the recipe's, with the sweep's winning values while the sweep is
    on (and the record of where they came from)."""
    if not cfg.tune.enabled:
        return cfg.train, None
    best = TuneBest.of(run).best
    return cfg.train.with_params(best.params), best.model_dump(exclude_none=True)


def _data(cfg: LoomConfig, run: RunDir) -> StageResult:
    from pipelines.data.stage import run_data

    return run_data(cfg.data, run, cfg.seed)


def _data_sources(cfg: LoomConfig) -> dict[str, str]:
    from pipelines.data.readers import SOURCES_CACHE, source_fingerprint

    return {"sources": source_fingerprint(cfg.data, cache=cfg.run_dir() / SOURCES_CACHE)}


def _tune(cfg: LoomConfig, run: RunDir) -> StageResult:
    from tune.stage import run_tune

    return run_tune(cfg.tune, cfg.train, run, cfg.seed, eval_config=cfg.eval)


def _train(cfg: LoomConfig, run: RunDir) -> StageResult:
    from pipelines.train.stage import run_train

    train, tuned = tuned_train_config(cfg, run)
    result = run_train(train, run, cfg.seed)
    if tuned is not None:
        result.metrics["tuned"] = tuned
    return result


def _compress(cfg: LoomConfig, run: RunDir) -> StageResult:
    from pipelines.compress.stage import run_compress

    train, _ = tuned_train_config(cfg, run)  # students train as the model did (the sweep's values included)
    return run_compress(cfg.compress, train, run, cfg.seed)


def _eval(cfg: LoomConfig, run: RunDir) -> StageResult:
    from pipelines.eval.stage import run_eval

    return run_eval(cfg.eval, run, cfg.seed, with_variants=cfg.compress.enabled)


def _serve(cfg: LoomConfig, run: RunDir) -> StageResult:
    from serve.stage import run_serve

    return run_serve(cfg.serve, run)


#: In chain order: the sweep decides the training run, so tune comes before train.
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "data",
            "curate, tokenize and pack the corpus",
            module="pipelines.data",
            run=_data,
            sections=("data", "seed"),
            sources=_data_sources,
        ),
        Stage(
            "tune",
            "sweep hyperparameters with Ray Tune + Optuna",
            module="tune",
            run=_tune,
            sections=("tune", "train", "seed"),
            # A sweep judged by an eval task builds and scores that task as the eval section says.
            sections_while=(("eval", "tune.objective"),),
            reads=(DataOutputs,),
            switch="tune.enabled",
        ),
        Stage(
            "train",
            "train with DeepSpeed on Ray Train",
            module="pipelines.train",
            run=_train,
            sections=("train", "seed"),
            # The sweep's winner while tune is on (a disabled stage is no input).
            reads=(DataOutputs, TuneBest),
        ),
        Stage(
            "compress",
            "sweep compressions of the trained model; keep the Pareto front",
            module="pipelines.compress",
            run=_compress,
            sections=("compress", "seed"),
            reads=(DataOutputs, TrainedModel, TuneBest),
            switch="compress.enabled",
        ),
        Stage(
            "eval",
            "score the model and its variants with lm-evaluation-harness",
            module="pipelines.eval",
            run=_eval,
            sections=("eval", "seed"),
            # The front while compress is on (a disabled stage is no input).
            reads=(DataOutputs, TrainedModel, CompressionFront),
            switch="eval.enabled",
        ),
        Stage(
            "serve",
            "serve the model with Ray Serve + vLLM",
            module="serve",
            run=_serve,
            sections=("serve",),
            # The front while compress is on (a model may ask for a variant or a draft); the eval scores while
            # eval is on (a variant choice may bound them).
            reads=(TrainedModel, CompressionFront, EvalResults),
            always_runs=True,
        ),
    )
}

#: Every stage a whole run uses, in chain order (``loom run``, ``loom validate``).
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)


def chain_stages(cfg: LoomConfig) -> list[str]:
    """The stages this recipe runs, in order: the sweeps only when enabled."""
    return [name for name, stage in STAGES.items() if stage.enabled(cfg)]
