"""The eval stage on the tiny run: tasks from held-out documents, scored by lm-evaluation-harness."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from pipelines.artifacts import CompressionFront, DataOutputs, EvalResults
from pipelines.data.heldout import MAX_SHARE
from pipelines.runs import RunDir
from tests.helpers import wait_for


def test_held_out_documents_are_a_capped_sample_of_each_source(data_done, tiny_config):
    run = RunDir(tiny_config.run_dir())
    outputs = DataOutputs.of(run)
    stats = json.loads(outputs.stats.read_text())
    held = pq.read_table(outputs.heldout).to_pylist()
    assert len(held) == stats["documents_heldout"] > 0
    kept_by_source = {}
    rejected = {r["doc_id"] for r in pq.read_table(outputs.rejects, columns=["doc_id"]).to_pylist()}
    for row in held:
        kept_by_source[row["source"]] = kept_by_source.get(row["source"], 0) + 1
        assert row["doc_id"] not in rejected and row["text"]
    # At most a tenth of a source: the two-document gz source keeps both for training.
    assert set(kept_by_source) == {"stdlib"}
    assert kept_by_source["stdlib"] <= min(tiny_config.data.heldout_documents, 120 * MAX_SHARE)


def test_eval_scores_the_model_and_each_variant_with_the_harness(eval_done, tiny_config):
    run = RunDir(tiny_config.run_dir())
    summary = EvalResults.of(run).summary()
    assert set(summary.tasks) == {"loom_perplexity_stdlib", "loom_choice", "loom_next_line"}
    assert all(info.rows > 0 for info in summary.tasks.values())
    variants = set(CompressionFront.of(run).kept())
    assert set(summary.models) == {"base", *variants}

    base = summary.models["base"]
    assert base.not_scored is None
    for task, info in summary.tasks.items():
        assert math.isfinite(base.tasks[task][info.headline].value), (task, base.tasks[task])
    assert 0 <= base.tasks["loom_choice"]["acc"].value <= 1 and base.tasks["loom_choice"]["acc"].stderr is not None
    # The harness's own files: its aggregated results and one sample file per task.
    harness = json.loads(open(base.harness_results).read())
    assert set(harness["results"]) == set(summary.tasks)
    assert harness["results"]["loom_choice"]["acc,none"] == base.tasks["loom_choice"]["acc"].value
    samples = {p.name.split("_20")[0] for p in EvalResults.of(run).root.joinpath("harness", "base").rglob("samples_*")}
    assert samples == {f"samples_{task}" for task in summary.tasks}

    # Each variant is scored, or says why not; a scored one has weights of its own, so its perplexity differs.
    scored = {name: s for name, s in summary.models.items() if name != "base" and s.not_scored is None}
    assert scored, {name: s.not_scored for name, s in summary.models.items()}
    for name, scores in summary.models.items():
        assert (scores.not_scored is None) == (name in scored or name == "base")
    for name, scores in scored.items():
        value = scores.tasks["loom_perplexity_stdlib"]["bits_per_byte"].value
        assert math.isfinite(value) and value != base.tasks["loom_perplexity_stdlib"]["bits_per_byte"].value, name

    report = (run.root / "report" / "index.html").read_text()
    assert "loom_choice · base" in report and "eval_scores.png" in report
    assert (run.root / "report" / "eval_scores.png").stat().st_size > 0
    assert eval_done["metrics"]["loom_choice.acc"] == base.tasks["loom_choice"]["acc"].value


def test_the_served_variant_changes_when_its_eval_bound_is_tightened(eval_done, tiny_config):
    from pipelines.compress.variants import servable_on_vllm
    from serve.config import ModelConfig
    from serve.stage import variant_source

    run = RunDir(tiny_config.run_dir())
    summary = EvalResults.of(run).summary()
    kept = CompressionFront.of(run).kept()
    task, metric = "loom_perplexity_stdlib", "bits_per_byte"
    base = summary.models["base"].tasks[task][metric].value
    # Each variant vLLM here serves and the harness scored: its bits per byte over the base's, minus one.
    worse = {
        name: scores.tasks[task][metric].value / base - 1
        for name, scores in summary.models.items()
        if name in kept and scores.not_scored is None and servable_on_vllm(kept[name].family, "cpu")
    }
    assert worse, {name: scores.not_scored for name, scores in summary.models.items()}
    smallest = min(worse, key=lambda name: kept[name].weight_bytes)

    def served(tolerance: float) -> str:
        model = ModelConfig.model_validate(
            {
                "variant": {
                    "rule": "smallest",
                    "max_perplexity_increase": 100,  # the eval bound alone decides
                    "eval_bounds": [{"task": task, "tolerance": tolerance}],
                }
            }
        )
        return variant_source("loom-tiny", model, run).name

    assert served(max(worse.values()) + 0.01) == smallest
    # Tightened to just under what the smallest variant needs (a barely trained model's variants may score better
    # than it: then the bound asks for more of an improvement than the smallest one made).
    better = sorted(value for value in worse.values() if value < worse[smallest])
    if better:
        tightened = (better[-1] + worse[smallest]) / 2
        assert served(tightened) != smallest
        assert worse[served(tightened)] <= tightened
    else:
        tightened = worse[smallest] - 0.01
        with pytest.raises(RuntimeError, match=f"keeps the eval bounds; .*{smallest} .*fails {task}.{metric}"):
            served(tightened)


def test_the_scores_are_in_prometheus_as_eval_json_has_them(eval_done, tiny_config, prometheus):
    """Every scored model's headline of every task, as the eval dashboard (cluster/dashboards/loom_eval.json) plots
    it: the value eval.json holds, labelled by run, model, task and metric, with which way is better."""
    run = RunDir(tiny_config.run_dir())
    summary = EvalResults.of(run).summary()
    expected = {
        (model, task, info.headline, info.better): summary.headline(task, model).value
        for model, scores in summary.models.items()
        if scores.not_scored is None
        for task, info in summary.tasks.items()
    }
    seen: dict = {}

    def every_headline_scraped() -> bool:
        found = prometheus.api("query", query=f'ray_loom_eval_headline{{run="{run.root.name}"}}')["result"]
        seen.clear()
        for series in found:
            labels = series["metric"]
            seen[(labels["model"], labels["task"], labels["metric"], labels["better"])] = float(series["value"][1])
        return set(seen) == set(expected)

    wait_for(
        every_headline_scraped, 120, lambda: f"the eval headlines in Prometheus: {sorted(seen)} of {sorted(expected)}"
    )
    assert all(math.isclose(seen[key], value, rel_tol=1e-6) for key, value in expected.items()), (seen, expected)
    stderr = prometheus.api(
        "query", query=f'ray_loom_eval_stderr{{run="{run.root.name}",model="base",task="loom_choice",metric="acc"}}'
    )
    assert math.isclose(
        float(stderr["result"][0]["value"][1]), summary.models["base"].tasks["loom_choice"]["acc"].stderr, rel_tol=1e-6
    )
