"""The compression sweep's front on the benchmarks' model (a 4-layer, 256-wide Llama, ~3.7M parameters,
trained on the standard-library slice): every candidate's weight bytes, held-out perplexity and tokens/s
as ratios to the base model measured in the same run and the same engine; pruned models with a recovery
fine-tune; a two-layer distilled student, and the base model generating with it as its speculative draft.

The base is trained once; the compress stage then runs RUNS times from scratch on it (base measured again,
every candidate built and measured again). Each ratio is the candidate's figure over the base's *in the
candidate's engine* in the same run (vLLM where vLLM serves the format here, transformers for
bitsandbytes on CPU), and the result file names that engine with every ratio."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.conftest import BENCH_MODEL, RUNS, comparison
from tests.conftest import TINY

# Base, students and recoveries train one after another, and the stage runs three times: far beyond the
# suite's 20-minute default.
pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(14400)]
TRAIN_STEPS = 300
STUDENT_STEPS = 300
RECOVERY_STEPS = 50
CANDIDATES = [
    "{family: w8a8}",
    "{family: bnb_int8}",
    "{family: bnb_nf4}",
    "{family: prune, heads_kept: 1.0, mlp_kept: 0.5, then_quantize: none}",
    "{family: prune, heads_kept: 1.0, mlp_kept: 0.5, then_quantize: w8a8}",
    "{family: prune, heads_kept: 0.5, mlp_kept: 0.75, then_quantize: none}",
    "{family: distill, layers_kept: 0.5, width_kept: 1.0}",
    "{family: distill, layers_kept: 0.25, width_kept: 1.0}",
]


def test_compression_front_against_the_base(tmp_path, record_benchmark):
    import ray

    from cluster.chain import run_stage
    from cluster.connect import connect
    from cluster.recipe import load_config

    cfg = load_config(
        TINY,
        [
            f"storage={tmp_path}",
            "run_name=compress-bench",
            *BENCH_MODEL,
            # One worker with both cores (ZeRO-0): ~4x the steps/s of two one-core ZeRO-2 workers here.
            "train.num_workers=1",
            "train.zero_stage=0",
            "train.cpus_per_worker=2",  # Ray sizes a worker's torch threads by its CPUs
            "train.lr=3e-3",
            f"train.max_steps={TRAIN_STEPS}",
            f"train.checkpoint_every={TRAIN_STEPS}",
            "tune.enabled=false",
            "compress.families=[bnb_int8, bnb_nf4, w8a8, prune, distill]",
            f"compress.num_trials={len(CANDIDATES) + 1}",  # and one of Optuna's own
            f"compress.prune.recovery_steps={RECOVERY_STEPS}",
            f"compress.distill={{steps: {STUDENT_STEPS}, lr: 3e-3, layers_kept: {{low: 0.25, high: 0.5}},"
            " width_kept: {low: 0.5, high: 1.0}}",
            f"compress.try_first=[{', '.join(CANDIDATES)}]",
            "compress.eval_rows=64",
            "compress.speed={requests: 8, prompt_tokens: 32, new_tokens: 64}",
        ],
    )
    connect(cfg.cluster)
    for stage in ("data", "train"):
        run_stage(stage, cfg)
    paretos = []
    for run in range(RUNS):
        run_stage("compress", cfg, force=run > 0)  # each run from scratch: base and candidates measured again
        paretos.append(json.loads((cfg.run_dir() / "compress" / "pareto.json").read_text()))
    ray.shutdown()
    for pareto in paretos:
        assert not pareto["failed"], pareto["failed"]

    # Per run: the base in each engine, each candidate (in its engine), and the base with the student as draft.
    quantities: dict[str, list[float]] = {}
    engines: dict[str, str] = {}

    def add(label: str, engine: str, measured: dict) -> None:
        engines[label] = engine
        for objective in ("weight_bytes", "perplexity", "tokens_per_s"):
            if objective in measured:
                quantities.setdefault(f"{label} {objective.replace('_', ' ')}", []).append(measured[objective])

    for pareto in paretos:
        for engine in ("vllm", "transformers"):
            add(f"base ({engine})", engine, pareto["base"][engine])
        for trial in pareto["trials"]:
            add(trial["name"], trial["engine"], trial)
        draft = pareto["draft"]
        add(f"base + {draft['variant']} draft", "vllm", {"tokens_per_s": draft["tokens_per_s"]})
    # A candidate Optuna proposed in only some runs has fewer values: left out rather than compared unevenly.
    quantities = {key: values for key, values in quantities.items() if len(values) == RUNS}
    comparisons = []
    for label, engine in engines.items():
        if label.startswith("base ("):
            continue
        base = f"base ({engine})"  # like with like: the base measured in the candidate's engine, same run
        for objective, better in (("weight bytes", "lower"), ("perplexity", "lower"), ("tokens per s", "higher")):
            if f"{label} {objective}" not in quantities:
                continue
            compared = comparison(
                f"{label}: {objective}",
                f"{label}, {objective} vs the base, both in {engine}",
                quantities,
                f"{label} {objective}",
                f"{base} {objective}",
                better=better,
            )
            comparisons.append({**compared, "engine": engine})
    headline = "w8a8-int8: weight bytes"
    comparisons.sort(key=lambda c: c["name"] != headline)
    last = paretos[-1]
    record_benchmark(
        "compress_front",
        stage="compress",
        measure="each candidate's weight bytes, perplexity and tokens/s over the base's in the same engine and run",
        inputs={
            "model": "4 layers x 256 wide, 4 heads, MLP 1024, vocab 2048 (~3.7M parameters)",
            "train_steps": TRAIN_STEPS,
            "student_steps": STUDENT_STEPS,
            "recovery_steps": RECOVERY_STEPS,
            "candidates": CANDIDATES,
            "eval_rows": 64,
            "speed": {"requests": 8, "prompt_tokens": 32, "new_tokens": 64},
        },
        quantities=quantities,
        comparisons=comparisons,
        engines=engines,
        # The stage's own front (last run) and each member's engine: a front whose members were measured
        # in different engines compares their raw tokens/s across engines.
        front=[{"candidate": m["name"] if m.get("trial_id") else "base", "engine": m["engine"]} for m in last["front"]],
        draft_acceptance_rate=[round(p["draft"]["acceptance_rate"], 3) for p in paretos],
        draft_mean_accepted_tokens=[round(p["draft"]["mean_accepted_tokens"], 2) for p in paretos],
    )
