"""The compression sweep's front on the benchmarks' model (a 4-layer, 256-wide Llama, ~3.7M parameters,
trained on the standard-library slice): every candidate's weight bytes, held-out perplexity and tokens/s
as ratios to the base model measured in the same run and the same engine; pruned models with a recovery
fine-tune; a two-layer distilled student, and the base model generating with it as its speculative draft."""

from __future__ import annotations

import json

import pytest

from tests.benchmarks.conftest import BENCH_MODEL
from tests.conftest import TINY

# Base, students and recoveries train one after another: far beyond the suite's 20-minute default.
pytestmark = [pytest.mark.benchmark, pytest.mark.timeout(5400)]
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
    for stage in ("data", "train", "compress"):
        run_stage(stage, cfg)
    ray.shutdown()
    pareto = json.loads((cfg.run_dir() / "compress" / "pareto.json").read_text())
    base = pareto["base"]
    rows = [
        {
            "candidate": "base",
            "engine": engine,
            "bytes": base[engine]["weight_bytes"],
            "perplexity": round(base[engine]["perplexity"], 3),
            "tokens_per_s": round(base[engine]["tokens_per_s"], 1),
            "bytes_x": 1.0,
            "perplexity_x": 1.0,
            "tokens_per_s_x": 1.0,
            "front": engine == "vllm" and base[engine]["on_front"],
        }
        for engine in ("vllm", "transformers")
    ]
    for trial in sorted(pareto["trials"], key=lambda t: t["weight_bytes"]):
        rows.append(
            {
                "candidate": trial["name"],
                "engine": trial["engine"],
                "bytes": trial["weight_bytes"],
                "perplexity": round(trial["perplexity"], 3),
                "tokens_per_s": round(trial["tokens_per_s"], 1),
                "bytes_x": round(trial["ratios"]["weight_bytes"], 3),
                "perplexity_x": round(trial["ratios"]["perplexity"], 4),
                "tokens_per_s_x": round(trial["ratios"]["tokens_per_s"], 3),
                "front": trial["on_front"],
            }
        )
    draft = pareto["draft"]
    rows.append(
        {
            "candidate": f"base + {draft['variant']} as draft (k={draft['num_speculative_tokens']})",
            "engine": "vllm",
            "bytes": base["vllm"]["weight_bytes"],
            "perplexity": round(base["vllm"]["perplexity"], 3),
            "tokens_per_s": round(draft["tokens_per_s"], 1),
            "bytes_x": 1.0,
            "perplexity_x": 1.0,
            "tokens_per_s_x": round(draft["ratios"]["tokens_per_s"], 3),
            "front": False,
        }
    )
    half_size = [r for r in rows[2:] if r["bytes_x"] <= 0.5 and r["perplexity_x"] <= 1.02]
    fast_students = [
        r
        for r in rows[2:]
        if r["candidate"].startswith("distilled-") and r["tokens_per_s_x"] >= 1.5 and r["perplexity_x"] <= 1.15
    ]
    record_benchmark(
        "compress_front",
        rows,
        model="4 layers x 256 wide, 4 heads, MLP 1024, vocab 2048 (~3.7M parameters)",
        train_steps=TRAIN_STEPS,
        student_steps=STUDENT_STEPS,
        recovery_steps=RECOVERY_STEPS,
        base_val_perplexity=round(base["vllm"]["perplexity"], 3),
        goal_half_bytes_within_2pct=[r["candidate"] for r in half_size],
        goal_student_1_5x_speed_within_15pct=[r["candidate"] for r in fast_students],
        draft_acceptance_rate=round(draft["acceptance_rate"], 3),
        draft_mean_accepted_tokens=round(draft["mean_accepted_tokens"], 2),
        failed=pareto["failed"],
    )
    assert not pareto["failed"]
