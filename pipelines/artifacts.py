"""What each stage writes and what the others read from it, as typed records with their paths.

Every stage writes its outputs where ``at(run)`` says and every consumer reads them through ``of(run)``,
which checks that the producing stage completed and names the command that makes what is missing. A
consumer's key includes ``fingerprint(run)`` of each artifact it reads: a sweep that picked another
winner, or a model trained again, makes everything built on it run again.

A leaf: it imports nothing of Loom but the run directory and the strict base model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field

from pipelines.runs import RunDir, hash_dir
from pipelines.schema import StrictModel


class MissingInputError(RuntimeError):
    """A stage's input is not there: its producing stage has not completed (the message says what to run)."""


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class Artifact:
    """One stage's output that other stages read. ``stage`` produced it; ``name`` labels it in keys."""

    stage: ClassVar[str]
    name: ClassVar[str]
    #: Its content follows from its stage's key (config and sources): a consumer's upstream key covers it.
    by_key: ClassVar[bool] = False

    @classmethod
    def label(cls) -> str:
        return f"{cls.stage}.{cls.name}"

    @classmethod
    def _require_complete(cls, run: RunDir, why: str = "") -> None:
        if not run.is_complete(cls.stage):
            raise MissingInputError(
                f"the {cls.stage} stage has not completed in {run.root}; run `loom {cls.stage}` first{why}"
            )

    @classmethod
    def fingerprint(cls, run: RunDir) -> str | None:
        """What a consumer's key takes from this artifact (None while it does not exist)."""
        raise NotImplementedError


@dataclass(frozen=True)
class DataOutputs(Artifact):
    """The data stage's packed token shards, held-out shards and documents, tokenizer and statistics."""

    stage: ClassVar[str] = "data"
    name: ClassVar[str] = "shards"
    by_key: ClassVar[bool] = True

    root: Path
    train: Path
    val: Path
    tokenizer: Path
    stats: Path
    rejects: Path
    #: Whole documents kept out of training (the eval stage's tasks are built from them).
    heldout: Path

    @classmethod
    def at(cls, run: RunDir) -> DataOutputs:
        root = run.stage_dir(cls.stage)
        return cls(
            root,
            root / "train",
            root / "val",
            root / "tokenizer",
            root / "stats.json",
            root / "rejects",
            root / "heldout",
        )

    @classmethod
    def of(cls, run: RunDir) -> DataOutputs:
        cls._require_complete(run)
        return cls.at(run)

    @property
    def has_val(self) -> bool:
        return self.val.is_dir()

    @property
    def seq_len(self) -> int:
        return int(json.loads(self.stats.read_text())["seq_len"])

    @classmethod
    def fingerprint(cls, run: RunDir) -> str | None:
        return run.completed_hash(cls.stage)  # the data stage's key: its config and its sources' fingerprint


class TunedValues(StrictModel):
    """The sweep's winner: the ``train.*`` values the train stage trains with."""

    trial_id: str = Field(description="Ray Tune's id of the best trial.")
    params: dict[str, Any] = Field(description="Dotted train.* keys to the values the trial trained with.")
    val_loss: float | None = Field(default=None, description="Its held-out loss at the trial's budget.")
    objective: str | None = Field(
        default=None, description="What the sweep judged trials by: val_loss, or an eval task's task.metric."
    )
    score: float | None = Field(default=None, description="Its figure on that objective.")


@dataclass(frozen=True)
class TuneBest(Artifact):
    """The tune stage's ``best.json``: the best trial (which train reads) and every trial's summary."""

    stage: ClassVar[str] = "tune"
    name: ClassVar[str] = "best"

    path: Path
    best: TunedValues

    @classmethod
    def path_in(cls, run: RunDir) -> Path:
        return run.stage_dir(cls.stage) / "best.json"

    @classmethod
    def write(cls, run: RunDir, summary: dict[str, Any]) -> Path:
        TunedValues.model_validate({k: summary["best"].get(k) for k in TunedValues.model_fields})
        path = cls.path_in(run)
        path.write_text(json.dumps(summary, indent=2) + "\n")
        return path

    @classmethod
    def of(cls, run: RunDir) -> TuneBest:
        path = cls.path_in(run)
        if not run.is_complete(cls.stage) or not path.is_file():
            raise MissingInputError(
                f"tune is enabled and has not completed in {run.root}: run `loom tune` first (the sweep picks the "
                "training run's values), or set tune.enabled=false to train with the recipe's own"
            )
        found = json.loads(path.read_text()).get("best", {})
        if "params" not in found:
            raise MissingInputError(
                f"{path} was written by an earlier Loom (no params): redo the sweep with `loom tune --force`"
            )
        return cls(path, TunedValues.model_validate({k: found.get(k) for k in TunedValues.model_fields}))

    @classmethod
    def fingerprint(cls, run: RunDir) -> str | None:
        path = cls.path_in(run)
        if not path.is_file():
            return None
        return _digest(json.loads(path.read_text()).get("best", {}).get("params"))


@dataclass(frozen=True)
class TrainedModel(Artifact):
    """The train stage's Hugging Face directory (safetensors + tokenizer), which transformers and vLLM load."""

    stage: ClassVar[str] = "train"
    name: ClassVar[str] = "model"

    path: Path

    @classmethod
    def at(cls, run: RunDir) -> TrainedModel:
        return cls(run.stage_dir(cls.stage) / "model")

    @classmethod
    def of(cls, run: RunDir) -> TrainedModel:
        model = cls.at(run)
        if not run.is_complete(cls.stage) or not (model.path / "config.json").is_file():
            raise MissingInputError(f"the train stage has not completed in {run.root}; run `loom train` first")
        return model

    @classmethod
    def fingerprint(cls, run: RunDir) -> str | None:
        """The model's content hash, recorded when train completed (hashed now only for a run from before)."""
        if not run.is_complete(cls.stage):
            return None
        recorded = run.manifest()["stages"].get(cls.stage, {}).get("outputs", {}).get("model_hash")
        path = cls.at(run).path
        return recorded or (hash_dir(path) if path.is_dir() else None)


class VariantLineage(StrictModel):
    base_model: str = Field(description="The trained model the variant was made from.")
    base_model_hash: str = Field(description="That model's content hash.")
    val_shards_hash: str = Field(description="Content hash of the held-out shards it was measured on.")


class VariantRecord(StrictModel):
    """``compression.json`` beside each kept variant: how it was made and what the compress stage measured."""

    name: str = Field(description="The variant's name (its directory under compress/variants/).")
    recipe: dict[str, Any] = Field(description="The family, its knobs and the shape they gave.")
    engine: str = Field(description="Where it was measured: vllm, or transformers where vLLM cannot load it here.")
    servable: bool = Field(description="Whether the serving engine on this hardware loads it.")
    perplexity: float
    weight_bytes: int
    tokens_per_s: float
    p50_latency_ms: float
    trial_id: str | None = None
    feasible: bool = True
    infeasible_reason: str | None = None
    on_front: bool = False
    ratios: dict[str, float] = Field(default_factory=dict, description="Objectives over the base's, same engine.")
    lineage: VariantLineage
    path: str
    speculative: dict[str, Any] | None = Field(
        default=None, description="What was measured when it drafted for the base model (distilled students)."
    )

    @property
    def family(self) -> str:
        return str(self.recipe["family"])


RECORD = "compression.json"


@dataclass(frozen=True)
class CompressionFront(Artifact):
    """The compress stage's ``pareto.json`` and the kept variants under ``variants/<name>/``."""

    stage: ClassVar[str] = "compress"
    name: ClassVar[str] = "front"

    root: Path

    @classmethod
    def at(cls, run: RunDir) -> CompressionFront:
        return cls(run.stage_dir(cls.stage))

    @classmethod
    def of(cls, run: RunDir) -> CompressionFront:
        front = cls.at(run)
        if not run.is_complete(cls.stage) or not front.pareto.is_file():
            raise MissingInputError(
                f"the compress stage has not completed in {run.root}; run `loom compress` (compress.enabled: true) "
                "first"
            )
        return front

    @property
    def pareto(self) -> Path:
        return self.root / "pareto.json"

    @property
    def variants_dir(self) -> Path:
        return self.root / "variants"

    def variant_dir(self, name: str) -> Path:
        return self.variants_dir / name

    def summary(self) -> dict[str, Any]:
        return json.loads(self.pareto.read_text())

    def write_variant(self, record: VariantRecord) -> None:
        (self.variant_dir(record.name) / RECORD).write_text(record.model_dump_json(indent=2) + "\n")

    def record(self, name: str) -> VariantRecord | None:
        return record_of(self.variant_dir(name))

    def kept(self) -> dict[str, VariantRecord]:
        """The kept variants on the front, by name."""
        kept = {name: self.record(name) for name in self.summary()["variants"]}
        missing = sorted(name for name, record in kept.items() if record is None)
        if missing:
            raise MissingInputError(f"{self.pareto} lists variants without their {RECORD}: {', '.join(missing)}")
        return kept  # type: ignore[return-value]

    @classmethod
    def fingerprint(cls, run: RunDir) -> str | None:
        front = cls.at(run)
        if not run.is_complete(cls.stage) or not front.pareto.is_file():
            return None
        summary = front.summary()
        return _digest(
            {"variants": summary.get("variants"), "front": summary.get("front"), "draft": summary.get("draft")}
        )


class TaskScore(StrictModel):
    """One metric of one task, as the harness reported it."""

    value: float
    stderr: float | None = Field(default=None, description="The harness's standard error (None where it gives N/A).")


class ModelScores(StrictModel):
    """Every task's metrics for one model, or why it was not scored."""

    path: str
    tasks: dict[str, dict[str, TaskScore]] = Field(default_factory=dict)
    harness_results: str | None = Field(default=None, description="The harness's own results file.")
    not_scored: str | None = Field(default=None, description="Why the model could not be scored here.")


class EvalTaskInfo(StrictModel):
    kind: str
    rows: int
    headline: str = Field(description="The metric the report leads with.")
    lower_is_better: bool

    @property
    def better(self) -> str:
        """Which way the task's metrics are better, in words: "lower" or "higher"."""
        return "lower" if self.lower_is_better else "higher"


class EvalSummary(StrictModel):
    """The eval stage's ``eval.json``: the tasks and each model's scores (base first, then the variants)."""

    tasks: dict[str, EvalTaskInfo]
    models: dict[str, ModelScores]

    def headline(self, task: str, model: str) -> TaskScore | None:
        """``model``'s score on ``task``'s headline metric (None where it has none)."""
        return self.models[model].tasks.get(task, {}).get(self.tasks[task].headline)


class EndpointScores(StrictModel):
    """``eval/endpoint/<model>/scores.json``: a served model's scores on the run's tasks through an endpoint
    (``loom eval --endpoint``)."""

    endpoint: str
    model: str
    tasks: dict[str, EvalTaskInfo]
    scores: ModelScores

    def headline(self, task: str) -> TaskScore | None:
        return self.scores.tasks.get(task, {}).get(self.tasks[task].headline)


#: The file each endpoint's scores are written to, in its folder under ``eval/endpoint/``.
ENDPOINT_SCORES = "scores.json"


@dataclass(frozen=True)
class EvalResults(Artifact):
    """The eval stage's ``eval.json`` and the harness's result files under ``harness/<model>/``."""

    stage: ClassVar[str] = "eval"
    name: ClassVar[str] = "scores"

    root: Path

    @classmethod
    def at(cls, run: RunDir) -> EvalResults:
        return cls(run.stage_dir(cls.stage))

    @property
    def summary_path(self) -> Path:
        return self.root / "eval.json"

    def summary(self) -> EvalSummary:
        return EvalSummary.model_validate_json(self.summary_path.read_text())

    @property
    def endpoint_root(self) -> Path:
        """Where ``loom eval --endpoint`` writes, one folder per served model id."""
        return self.root / "endpoint"

    def endpoint_scores(self) -> list[EndpointScores]:
        """Every served model scored through an endpoint in this run."""
        return [
            EndpointScores.model_validate_json(path.read_text())
            for path in sorted(self.endpoint_root.glob(f"*/{ENDPOINT_SCORES}"))
        ]

    @classmethod
    def of(cls, run: RunDir) -> EvalResults:
        results = cls.at(run)
        if not run.is_complete(cls.stage) or not results.summary_path.is_file():
            raise MissingInputError(f"the eval stage has not completed in {run.root}; run `loom eval` first")
        return results

    @classmethod
    def fingerprint(cls, run: RunDir) -> str | None:
        results = cls.at(run)
        if not run.is_complete(cls.stage) or not results.summary_path.is_file():
            return None
        return _digest(json.loads(results.summary_path.read_text()))


def record_of(directory: Path) -> VariantRecord | None:
    """The record beside a model directory the compress stage kept (None for any other directory)."""
    path = Path(directory) / RECORD
    return VariantRecord.model_validate_json(path.read_text()) if path.is_file() else None


#: Every artifact type, for the checks that stages read only what they declare.
ARTIFACTS: tuple[type[Artifact], ...] = (DataOutputs, TuneBest, TrainedModel, CompressionFront, EvalResults)
