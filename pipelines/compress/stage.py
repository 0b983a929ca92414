"""The compress stage: Optuna proposes compressions of the trained model (a conditional space over the
recipe's families and their knobs), each trial builds its candidate and measures it in the engine that
would serve it, and the non-dominated candidates (perplexity, weight bytes, tokens/s) within the quality
bound are kept.

Outputs under ``<run>/compress/``: ``base.json`` (the base model measured in vLLM and in transformers),
``sweep/`` (Ray Tune's experiment; a driver killed mid-sweep resumes it), ``pareto.json`` (every
candidate with its recipe, objectives, ratios to the base and verdict; the front; lineage) and
``variants/<name>/`` (each front member, a Hugging Face directory with its ``compression.json``). The best
distilled student is also measured as the base model's speculative-decoding draft in vLLM (tokens/s and
acceptance rate: ``pareto.json``'s ``draft``) and kept under ``variants/`` for serving as one. The plot is
``<run>/report/compress_pareto.png``.

Trials run one at a time: a candidate's tokens/s is only comparable to the base's when nothing else runs
beside it.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path
from typing import Any

from pipelines.artifacts import (
    CompressionFront,
    DataOutputs,
    MissingInputError,
    TrainedModel,
    VariantLineage,
    VariantRecord,
)
from pipelines.compress.config import FAMILIES, CompressConfig
from pipelines.compress.front import OBJECTIVES, Candidate, judge, pareto_front, plot_front
from pipelines.compress.variants import DISTILLED_PREFIX, FIXED_NAMES, PRUNED_PREFIX, servable_on_vllm
from pipelines.runs import RunDir, StageResult, hash_dir
from pipelines.sweeps import (
    optuna_sampler,
    releasing_trials_placement_groups,
    resumable_sweep,
    sweep_identity,
    trial_progress_callback,
)
from pipelines.train.config import TrainConfig


def suggest(trial, families: list[str], prune: dict[str, Any], distill: dict[str, Any]) -> None:
    """The conditional space, define-by-run: a family, then that family's knobs."""
    family = trial.suggest_categorical("family", families)
    if family == "prune":
        trial.suggest_float("prune.heads_kept", prune["heads_kept"]["low"], prune["heads_kept"]["high"])
        trial.suggest_float("prune.mlp_kept", prune["mlp_kept"]["low"], prune["mlp_kept"]["high"])
        trial.suggest_categorical("prune.then_quantize", prune["then_quantize"])
    elif family == "distill":
        trial.suggest_float("distill.layers_kept", distill["layers_kept"]["low"], distill["layers_kept"]["high"])
        trial.suggest_float("distill.width_kept", distill["width_kept"]["low"], distill["width_kept"]["high"])


def distill_into(
    out: Path,
    *,
    settings: CompressConfig,
    train: TrainConfig,
    run: RunDir,
    seed: int,
    steps: int,
    model: dict[str, int] | None = None,
    init_from: Path | None = None,
) -> dict[str, Any]:
    """Train a model against the base model's logits on the run's shards (Ray Train + DeepSpeed, with
    train's workers, batch and fault tolerance; a retried trial resumes from its last checkpoint), export it
    to ``out`` and return its last metrics: a fresh student of shape ``model``, or ``init_from``'s weights
    (a pruned model's recovery)."""
    import ray.tune

    from pipelines.train.config import DistillConfig
    from pipelines.train.trainer import build_trainer, copy_export, while_fitting

    knobs = settings.distill
    teacher = DistillConfig(teacher=str(TrainedModel.of(run).path), temperature=knobs.temperature, alpha=knobs.alpha)
    student = train.for_student(
        teacher, steps, lr=knobs.lr, shape=model, init_from=str(init_from) if init_from else None
    )
    trainer = build_trainer(
        student,
        run,
        seed,
        storage_path=CompressionFront.at(run).root / "students",
        name=ray.tune.get_context().get_trial_id(),
    )
    with while_fitting(student, stop_when_lost=False):
        result = trainer.fit()
    copy_export(result, out)
    return result.metrics


def build_candidate(
    params: dict[str, Any],
    out: Path,
    calibration: list[list[int]],
    *,
    settings: CompressConfig,
    train: TrainConfig,
    run: RunDir,
    seed: int,
) -> tuple[str, dict]:
    """Write the candidate ``params`` describe into ``out``; its name and recipe (with the shape it ended up with)."""
    from pipelines.compress.prune import prune_structured, pruned_shape
    from pipelines.compress.quantize import bnb_quantize, w8a8_int8

    base = TrainedModel.of(run).path
    family = params["family"]
    recipe: dict[str, Any] = {"family": family, "description": FAMILIES[family]}
    if family in ("bnb_int8", "bnb_nf4"):
        bnb_quantize(base, out, 8 if family == "bnb_int8" else 4)
        return FIXED_NAMES[family], recipe
    if family == "w8a8":
        w8a8_int8(base, out)
        return FIXED_NAMES[family], recipe
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    heads, width = params["prune.heads_kept"], params["prune.mlp_kept"]
    groups, kept_width = pruned_shape(config, heads, width)
    quantize = params["prune.then_quantize"]
    recovery = settings.prune.recovery_steps
    recipe.update(
        heads_kept=heads,
        mlp_kept=width,
        then_quantize=quantize,
        kv_head_groups=f"{groups}/{config.num_key_value_heads}",
        mlp_channels=f"{kept_width}/{config.intermediate_size}",
        recovery_steps=recovery,
    )
    name = f"{PRUNED_PREFIX}g{groups}of{config.num_key_value_heads}-m{kept_width}of{config.intermediate_size}"
    scratch = [out.with_name(out.name + suffix) for suffix in (".pruned", ".recovered")]
    for leftover in scratch:  # a retried trial's
        shutil.rmtree(leftover, ignore_errors=True)
    pruned = out if quantize == "none" and not recovery else scratch[0]
    prune_structured(base, pruned, heads, width, calibration)
    if recovery:
        recovered = out if quantize == "none" else scratch[1]
        metrics = distill_into(
            recovered, settings=settings, train=train, run=run, seed=seed, steps=recovery, init_from=pruned
        )
        recipe.update(recovered_steps=metrics.get("step"), recovered_val_loss=metrics.get("val_loss"))
        pruned = recovered
    if quantize == "w8a8":
        w8a8_int8(pruned, out)
        name += "-w8a8"
    for leftover in scratch:
        shutil.rmtree(leftover, ignore_errors=True)
    return name, recipe


def train_student(
    params: dict[str, Any], settings: CompressConfig, train: TrainConfig, run: RunDir, seed: int, out: Path
) -> tuple[str, dict]:
    """A smaller Llama trained on the run's shards against the base model's logits."""
    from transformers import AutoConfig

    from pipelines.compress.distill import student_shape

    teacher = AutoConfig.from_pretrained(TrainedModel.of(run).path)
    layers, width = params["distill.layers_kept"], params["distill.width_kept"]
    shape = student_shape(teacher, layers, width)
    knobs = settings.distill
    metrics = distill_into(out, settings=settings, train=train, run=run, seed=seed, steps=knobs.steps, model=shape)
    recipe = {
        "family": "distill",
        "description": FAMILIES["distill"],
        "layers_kept": layers,
        "width_kept": width,
        "layers": f"{shape['num_layers']}/{teacher.num_hidden_layers}",
        "hidden_size": f"{shape['hidden_size']}/{teacher.hidden_size}",
        "steps": knobs.steps,
        "trained_steps": metrics.get("step"),
        "student_val_loss": metrics.get("val_loss"),
        "temperature": knobs.temperature,
        "alpha": knobs.alpha,
    }
    return f"{DISTILLED_PREFIX}l{shape['num_layers']}-h{shape['hidden_size']}", recipe


def measure(model_dir: Path, engine: str, rows: list[list[int]], speed: dict[str, int]):
    from pipelines.compress.measure import Load, measure_transformers, measure_vllm

    load = Load(**speed)
    return measure_vllm(model_dir, rows, load) if engine == "vllm" else measure_transformers(model_dir, rows, load)


def run_candidate(
    params: dict[str, Any],
    *,
    val_dir: str,
    config: dict[str, Any],
    train: dict[str, Any],
    run_root: str,
    seed: int,
    base: dict[str, dict[str, Any]],
) -> None:
    """Tune trainable: build one candidate into ``candidates/<trial>/`` and report its measured objectives, and
    each as a ratio to ``base`` measured in the same engine, which is what Optuna steers on."""
    import ray.tune

    from pipelines.compress.measure import held_out_rows

    settings = CompressConfig.model_validate(config)
    run = RunDir(run_root)
    rows = held_out_rows(Path(val_dir), max(settings.eval_rows, settings.calibration_rows))
    candidate_dir = CompressionFront.at(run).root / "candidates" / ray.tune.get_context().get_trial_id()
    shutil.rmtree(candidate_dir, ignore_errors=True)
    train_config = TrainConfig.model_validate(train)
    if params["family"] == "distill":
        name, recipe = train_student(params, settings, train_config, run, seed, candidate_dir)
    else:
        calibration = rows[: settings.calibration_rows]
        name, recipe = build_candidate(
            params, candidate_dir, calibration, settings=settings, train=train_config, run=run, seed=seed
        )
    servable = servable_on_vllm(params["family"], "gpu" if settings.use_gpu else "cpu")
    engine = "vllm" if servable else "transformers"
    measured = measure(candidate_dir, engine, rows[: settings.eval_rows], settings.speed.model_dump())
    ray.tune.report(
        {
            "name": name,
            "recipe": recipe,
            "servable": servable,
            "candidate_dir": str(candidate_dir),
            **measured.__dict__,
            **{ratio_metric(k): getattr(measured, k) / base[engine][k] for k in OBJECTIVES},
        }
    )


def ratio_metric(objective: str) -> str:
    """The name a trial reports an objective's ratio to the base under (what the search compares)."""
    return f"{objective}_ratio"


def _measure_base(base_model: str, val_dir: str, config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The base model in both engines: each candidate is compared with the base measured where it was."""
    from pipelines.compress.measure import held_out_rows

    settings = CompressConfig.model_validate(config)
    rows = held_out_rows(Path(val_dir), settings.eval_rows)
    speed = settings.speed.model_dump()
    return {engine: measure(Path(base_model), engine, rows, speed).__dict__ for engine in ("vllm", "transformers")}


def _inputs(run: RunDir) -> dict[str, Path]:
    model = TrainedModel.of(run).path
    val = DataOutputs.of(run).val
    if not val.is_dir():
        raise MissingInputError(f"the data stage wrote no held-out split in {val}: compress measures perplexity on it")
    return {"model": model, "val": val}


def run_compress(config: CompressConfig, train: TrainConfig, run: RunDir, seed: int) -> StageResult:
    """Measure the base, sweep the candidates (resuming an interrupted sweep), keep the front."""
    from ray import tune

    inputs = _inputs(run)
    out = run.begin("compress")
    hashes = {"base_model": hash_dir(inputs["model"]), "val_shards": hash_dir(inputs["val"])}
    settings = config.model_dump(mode="json")
    # "steers_on": a sweep from before its trials reported ratios to the base is started afresh, not resumed.
    described = {**settings, **hashes, "seed": seed, "train": train.model_dump(mode="json"), "steers_on": "ratios"}
    identity = sweep_identity(described)
    resources = {"CPU": config.cpus_per_trial, "GPU": 1 if config.use_gpu else 0}
    base = _base_measurement(out, inputs, settings, identity, resources, hashes)
    trainable = tune.with_resources(
        tune.with_parameters(
            run_candidate,
            val_dir=str(inputs["val"]),
            config=settings,
            train=train.model_dump(mode="json"),
            run_root=str(run.root),
            seed=seed,
            base=base["engines"],
        ),
        resources,
    )
    tuner = resumable_sweep(out, trainable, identity, "compress", also_clear=("candidates", "variants", "students"))
    with releasing_trials_placement_groups("compress"):
        results = (tuner or _new_sweep(trainable, config, seed, out)).fit()
    candidates, bases, failed = _candidates(results, base)
    student = best_student(candidates) if config.draft.enabled else None
    draft = _draft_measurement(out, student, inputs, settings, resources, bases["vllm"]) if student else None
    return _summarise(candidates, bases, failed, draft, base, config, run)


def measured_remotely(measure, resources: dict[str, float], *args) -> Any:
    """``measure(*args)`` as a Ray task with a trial's resources: it competes for the machine like one."""
    import ray

    task = ray.remote(measure).options(num_cpus=resources["CPU"], num_gpus=resources["GPU"])
    return ray.get(task.remote(*args))


def _base_measurement(
    out: Path,
    inputs: dict[str, Path],
    settings: dict[str, Any],
    identity: str,
    resources: dict[str, float],
    hashes: dict[str, str],
) -> dict[str, Any]:
    """``base.json``: the base model measured in both engines, once per setup (a resumed sweep reuses it)."""

    base_file = out / "base.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() else {}
    if base.get("identity") == identity:
        return base
    print("[loom] compress: measuring the base model in vLLM and transformers", flush=True)
    measured = measured_remotely(_measure_base, resources, str(inputs["model"]), str(inputs["val"]), settings)
    base = {"identity": identity, "model": str(inputs["model"]), **hashes, "engines": measured}
    base_file.write_text(json.dumps(base, indent=2) + "\n")
    return base


def best_student(candidates: list[Candidate]) -> Candidate | None:
    """The distilled student closest to the base (lowest perplexity): the draft most likely to be accepted."""
    students = [c for c in candidates if c.recipe["family"] == "distill"]
    return min(students, key=lambda c: c.perplexity) if students else None


def _measure_draft(base_model: str, draft_dir: str, val_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    from pipelines.compress.measure import Load, held_out_rows, measure_speculative

    settings = CompressConfig.model_validate(config)
    rows = held_out_rows(Path(val_dir), settings.eval_rows)
    load = Load(**settings.speed.model_dump())
    tokens = settings.draft.num_speculative_tokens
    return measure_speculative(Path(base_model), Path(draft_dir), tokens, rows, load).__dict__


def _draft_measurement(
    out: Path,
    student: Candidate,
    inputs: dict[str, Path],
    settings: dict[str, Any],
    resources: dict[str, float],
    base: Candidate,
) -> dict[str, Any]:
    """The base model generating with ``student`` as its speculative draft, in vLLM at the sweep's load."""

    print(f"[loom] compress: measuring {student.name} as the base model's speculative draft", flush=True)
    draft_dir = out / "candidates" / student.trial_id
    measured = measured_remotely(
        _measure_draft, resources, str(inputs["model"]), str(draft_dir), str(inputs["val"]), settings
    )
    return {
        "variant": student.name,
        "trial_id": student.trial_id,
        "method": "draft_model",
        **measured,
        "ratios": {"tokens_per_s": measured["tokens_per_s"] / base.tokens_per_s},
    }


def _new_sweep(trainable, config: CompressConfig, seed: int, out: Path):
    """The Tuner: Optuna's multi-objective search over the conditional space, one trial at a time."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    settings = config.model_dump(mode="json")
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=OptunaSearch(
                space=functools.partial(
                    suggest, families=settings["families"], prune=settings["prune"], distill=settings["distill"]
                ),
                metric=[ratio_metric(k) for k in OBJECTIVES],  # like with like: each engine's own base
                mode=list(OBJECTIVES.values()),
                sampler=optuna_sampler(config.search, seed, startup_trials=min(4, config.num_trials)),
                points_to_evaluate=[point.params() for point in config.try_first] or None,
            ),
            num_samples=config.num_trials,
            max_concurrent_trials=1,  # tokens/s compares with the base's only when nothing runs beside it
        ),
        run_config=tune.RunConfig(
            name="sweep", storage_path=str(out), verbose=0, callbacks=[trial_progress_callback("compress")]
        ),
    )


def _candidates(results, base: dict[str, Any]) -> tuple[list[Candidate], dict[str, Candidate], list[dict]]:
    bases = {
        engine: Candidate(
            name="base",
            recipe={"family": "none", "description": "the trained model as exported by the train stage"},
            engine=engine,
            servable=True,
            **{k: v for k, v in measured.items() if k != "engine"},
        )
        for engine, measured in base["engines"].items()
    }
    candidates, failed = [], []
    for result in results:
        trial_id = result.path.rsplit("/", 1)[-1]
        metrics = result.metrics or {}
        if result.error or "perplexity" not in metrics:
            failed.append({"trial": trial_id, "params": result.config, "error": str(result.error)})
            continue
        candidates.append(
            Candidate(
                name=metrics["name"],
                recipe={**metrics["recipe"], "params": result.config},
                engine=metrics["engine"],
                servable=metrics["servable"],
                perplexity=metrics["perplexity"],
                weight_bytes=metrics["weight_bytes"],
                tokens_per_s=metrics["tokens_per_s"],
                p50_latency_ms=metrics["p50_latency_ms"],
                trial_id=metrics["trial_id"],
            )
        )
    return candidates, bases, failed


def _summarise(
    candidates: list[Candidate],
    bases: dict[str, Candidate],
    failed: list[dict],
    draft: dict[str, Any] | None,
    base: dict[str, Any],
    config: CompressConfig,
    run: RunDir,
) -> StageResult:
    """Judge every candidate against the base, keep the front (and the measured draft) as variants, write
    pareto.json and the plot."""
    front_dir = CompressionFront.at(run)
    out = front_dir.root
    judge(candidates, bases, config.max_perplexity_increase)
    reference = bases["vllm"]
    judge([reference], bases, config.max_perplexity_increase)
    front = pareto_front([reference, *candidates])
    variants = out / "variants"
    shutil.rmtree(variants, ignore_errors=True)
    kept: dict[str, Candidate] = {}
    for member in front:
        if member.trial_id is None or member.name in kept:  # the base stays in train/model; a repeat adds nothing
            continue
        kept[member.name] = member
    if draft is not None and draft["variant"] not in kept:  # the draft is served beside its target, front or not
        kept[draft["variant"]] = next(c for c in candidates if c.trial_id == draft["trial_id"])
    for name, member in kept.items():
        shutil.copytree(Path(out / "candidates" / member.trial_id), variants / name)
    lineage = VariantLineage(
        base_model=base["model"], base_model_hash=base["base_model"], val_shards_hash=base["val_shards"]
    )
    for name, member in kept.items():
        speculative = draft if draft is not None and name == draft["variant"] else None
        front_dir.write_variant(
            VariantRecord(**member.as_dict(), lineage=lineage, path=str(variants / name), speculative=speculative)
        )
    summary = {
        "objectives": OBJECTIVES,
        "constraint": {"max_perplexity_increase": config.max_perplexity_increase},
        "base": {engine: candidate.as_dict() for engine, candidate in bases.items()},
        "front": [{**m.as_dict(), "path": str(variants / m.name) if m.trial_id else base["model"]} for m in front],
        "variants": sorted({m.name for m in front if m.name in kept}),
        "draft": draft,
        "trials": [c.as_dict() for c in candidates],
        "failed": failed,
        "lineage": lineage.model_dump(),
    }
    (out / "pareto.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot = plot_front([reference, *candidates], run.root / "report" / "compress_pareto.png")
    # The front is in variants/: the other candidates and the students' runs (optimizer states) go.
    for scratch in ("candidates", "students"):
        shutil.rmtree(out / scratch, ignore_errors=True)
    if not candidates:
        raise RuntimeError(f"compress: no candidate was measured; failures: {failed}")
    return StageResult(
        inputs={"base_model": base["base_model"], "val_shards": base["val_shards"]},
        outputs={"pareto": str(out / "pareto.json"), "variants": str(variants), "plot": str(plot)},
        metrics={
            "trials": len(candidates) + len(failed),
            "failed": len(failed),
            "front": [m.name for m in front],
            "variants": {name: {k: round(v, 4) for k, v in m.ratios.items()} for name, m in kept.items()},
            "draft": {
                "variant": draft["variant"],
                "acceptance_rate": round(draft["acceptance_rate"], 4),
                "tokens_per_s": round(draft["ratios"]["tokens_per_s"], 4),
            }
            if draft
            else None,
        },
    )
