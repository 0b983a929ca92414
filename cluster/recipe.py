"""The root config: one YAML recipe, validated into one strict object.

Each stage receives only its own section. Dotted overrides (``train.lr=3e-4``)
are applied to the raw YAML before validation, so a typo in an override is
reported like a typo in the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from cluster.config import ClusterConfig, MonitorConfig
from pipelines.compress.config import CompressConfig
from pipelines.data.config import DataConfig
from pipelines.eval.config import EvalConfig
from pipelines.eval.tasks import KIND_METRICS, task_names
from pipelines.schema import StrictModel, pydantic_problems
from pipelines.train.config import TrainConfig
from serve.config import ServeConfig
from tune.config import TuneConfig, space_problems

RECIPES_DIR = Path(__file__).resolve().parent.parent / "pipelines" / "recipes"
# vLLM's CPU attention kernels exist for these head sizes only (vllm/v1/attention/backends/cpu_attn.py).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
DEFAULT_RECIPE = RECIPES_DIR / "tiny.yaml"


class LoomConfig(StrictModel):
    run_name: str = Field(
        default="tiny", pattern=r"^[A-Za-z0-9._-]+$", description="Name of the run directory under storage."
    )
    storage: str = Field(
        default="runs",
        description="Local directory holding run directories (relative paths are taken from the "
        "current directory). On a multi-node cluster it must be a shared filesystem.",
    )
    seed: int = Field(default=0, ge=0, description="Seed for shuffling, initialisation and sampling.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data curation stage.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training stage.")
    tune: TuneConfig = Field(default_factory=TuneConfig, description="Hyperparameter sweep stage.")
    compress: CompressConfig = Field(
        default_factory=CompressConfig, description="Compression sweep stage (quantization, pruning; Pareto front)."
    )
    eval: EvalConfig = Field(
        default_factory=EvalConfig,
        description="Eval stage: the model and its variants scored with lm-evaluation-harness on held-out tasks.",
    )
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving stage.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Ray cluster and job submission.")
    monitor: MonitorConfig = Field(
        default_factory=MonitorConfig, description="Prometheus for the cluster (`loom monitor`): SLOs and alert rules."
    )

    @model_validator(mode="after")
    def _storage_is_a_path(self) -> LoomConfig:
        if "://" in self.storage:
            raise ValueError(f"storage '{self.storage}': only local (or shared-filesystem) paths are supported")
        return self

    def stage_problems(self, stages: list[str] | None = None) -> list[tuple[str, str]]:
        """Problems across sections that only the given stages (None: every stage) care about: ``loom data`` does not
        refuse a model shape only the serve stage would trip on."""
        problems = []
        model = self.train.model

        def checks(*names: str) -> bool:
            return stages is None or any(name in stages for name in names)

        if checks("tune"):
            problems += space_problems(self.tune, self.train)
            if self.tune.enabled and self.tune.objective is not None:
                problems += self._objective_problems()
        if checks("train", "tune") and model.max_position_embeddings < self.data.seq_len:
            problems.append(
                (
                    "train.model.max_position_embeddings",
                    f"{model.max_position_embeddings} is shorter than data.seq_len ({self.data.seq_len})",
                )
            )
        if checks("eval") and self.eval.enabled and self.data.heldout_documents == 0:
            problems.append(
                (
                    "eval.enabled",
                    "the eval stage builds its tasks from held-out documents, but data.heldout_documents is 0",
                )
            )
        if not checks("serve"):
            return problems
        head_dim = model.hidden_size // model.num_heads
        for model_id, served in self.serve.models.items():
            bounded = {
                "variant.eval_bounds": served.variant is not None and served.variant.eval_bounds,
                "canary.gate.eval_bounds": served.canary is not None
                and served.canary.gate is not None
                and served.canary.gate.eval_bounds,
            }
            for where, bounds in bounded.items():
                if bounds and not self.eval.enabled:
                    problems.append(
                        (
                            f"serve.models.{model_id}.{where}",
                            "judges by the eval stage's scores, but eval.enabled is false: no stage scores them",
                        )
                    )
            if served.variant is not None and not self.compress.enabled:
                problems.append(
                    (
                        f"serve.models.{model_id}.variant",
                        "serves a compressed variant, but compress.enabled is false: no stage makes one",
                    )
                )
            if served.engine.speculative is not None:
                if not self.compress.enabled or "distill" not in self.compress.families:
                    problems.append(
                        (
                            f"serve.models.{model_id}.engine.speculative",
                            "drafts with a distilled student, but the compress stage trains none "
                            "(needs compress.enabled: true and distill in compress.families)",
                        )
                    )
                elif served.engine.speculative.draft is None and not self.compress.draft.enabled:
                    problems.append(
                        (
                            f"serve.models.{model_id}.engine.speculative.draft",
                            "unset means the draft the compress stage measured, but compress.draft.enabled is false",
                        )
                    )
            if served.source is not None:
                continue  # a given directory: only the trained model has this recipe's train.model shape
            if served.engine.max_model_len > model.max_position_embeddings:
                problems.append(
                    (
                        f"serve.models.{model_id}.engine.max_model_len",
                        f"{served.engine.max_model_len} exceeds train.model.max_position_embeddings "
                        f"({model.max_position_embeddings})",
                    )
                )
            if served.accelerator == "cpu" and head_dim not in VLLM_CPU_HEAD_SIZES:
                problems.append(
                    (
                        "train.model",
                        f"head size hidden_size/num_heads = {head_dim} cannot be served by vLLM on CPU "
                        f"(supported: {', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); serve.models.{model_id} serves it",
                    )
                )
        return problems

    def _objective_problems(self) -> list[tuple[str, str]]:
        """A sweep judged by an eval task needs the task to be one the eval section builds from held-out documents."""
        problems = []
        if self.data.heldout_documents == 0:
            problems.append(
                (
                    "tune.objective",
                    "judges trials by an eval task, built from held-out documents, but data.heldout_documents is 0",
                )
            )
        objective = self.tune.objective
        names = task_names(self.eval, [source.name for source in self.data.sources])
        kind = names.get(objective.task)
        if kind is None:
            problems.append(
                (
                    "tune.objective.task",
                    f"{objective.task!r} is not a task eval.tasks builds for this recipe's sources; "
                    f"those are: {', '.join(names)}",
                )
            )
        elif objective.metric is not None and objective.metric not in KIND_METRICS[kind]:
            problems.append(
                (
                    "tune.objective.metric",
                    f"{objective.task} reports no {objective.metric!r}; its metrics: {', '.join(KIND_METRICS[kind])}",
                )
            )
        return problems

    def run_dir(self) -> Path:
        return (Path(self.storage) / self.run_name).resolve()


class ConfigError(Exception):
    """Every problem found in a recipe, each as (key path, message)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {len(problems)} problem(s)"]
        lines += [f"  {key or '<root>'}: {message}" for key, message in problems]
        super().__init__("\n".join(lines))


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Turn ``a.b=value`` strings into a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append((item, "override must look like 'section.key=value'"))
            continue
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as err:
            problems.append((key, f"value {raw!r} is not valid YAML: {err}"))
            continue
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                problems.append((key, f"'{part}' is set both as a value and as a section"))
                break
            node = child
        else:
            node[leaf] = value
    return nested, problems


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, section by section. A mapping that names its ``kind`` (a search-space
    distribution) replaces the one it overrides: a choice's values and a range's bounds do not mix."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and "kind" not in value:
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def validate_dict(raw: dict[str, Any], source: str = "<config>") -> LoomConfig:
    try:
        return LoomConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(source, pydantic_problems(err)) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    stages: tuple[str, ...] | list[str] | None = None,
) -> LoomConfig:
    """Read a YAML recipe, apply dotted overrides, validate for ``stages``; raise ConfigError listing every problem."""
    path = Path(path) if path is not None else DEFAULT_RECIPE
    source = str(path)
    if not path.is_file():
        raise ConfigError(source, [("", f"recipe file not found: {path}")])
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(source, [("", f"not valid YAML: {err}")]) from None
    if not isinstance(raw, dict):
        raise ConfigError(source, [("", f"a recipe is a mapping of sections, got {type(raw).__name__}")])
    nested, problems = parse_overrides(overrides or [])
    try:
        config = validate_dict(_merge(raw, nested), source)
    except ConfigError as err:
        raise ConfigError(source, problems + err.problems) from None
    problems += config.stage_problems(None if stages is None else list(stages))
    if problems:
        raise ConfigError(source, problems)
    return config


def config_hash(section: StrictModel | dict[str, Any]) -> str:
    """Stable short hash of a config (section) for lineage."""
    data = section.model_dump(mode="json") if isinstance(section, StrictModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
