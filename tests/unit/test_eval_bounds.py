"""Decisions by eval: a variant's eval scores against the base's, and the serving choice that follows them."""

from __future__ import annotations

import re

import pytest

from pipelines.artifacts import EvalSummary, EvalTaskInfo, ModelScores, TaskScore
from pipelines.eval.bounds import EvalBound, UnknownBoundError, bound_failures
from tests.unit.test_compress import variant_record


def _summary() -> EvalSummary:
    def scores(bpb: float, acc: float) -> ModelScores:
        return ModelScores(
            path="/models/x",
            tasks={
                "loom_perplexity_code": {"bits_per_byte": TaskScore(value=bpb), "word_perplexity": TaskScore(value=9)},
                "loom_choice": {"acc": TaskScore(value=acc, stderr=0.05), "acc_norm": TaskScore(value=acc)},
            },
        )

    return EvalSummary(
        tasks={
            "loom_perplexity_code": EvalTaskInfo(
                kind="perplexity", rows=8, headline="bits_per_byte", lower_is_better=True
            ),
            "loom_choice": EvalTaskInfo(kind="choice", rows=8, headline="acc", lower_is_better=False),
        },
        models={
            "base": scores(bpb=2.0, acc=0.50),
            "w8a8-int8": scores(bpb=2.02, acc=0.50),  # 1% more bits per byte, the same accuracy
            "pruned-g1of2-m128of256": scores(bpb=2.4, acc=0.40),  # 20% more bits, a fifth less accuracy
            "bnb-nf4": ModelScores(path="/models/nf4", not_scored="the hf backend could not load it"),
        },
    )


def test_a_bound_holds_within_its_tolerance_and_fails_when_it_is_tightened():
    summary = _summary()
    perplexity = EvalBound(task="loom_perplexity_code", tolerance=0.05)
    assert bound_failures(summary, "w8a8-int8", [perplexity]) == []
    [failure] = bound_failures(summary, "w8a8-int8", [perplexity.model_copy(update={"tolerance": 0.005})])
    assert failure == "loom_perplexity_code.bits_per_byte 2.02 above the bound 2.01 (base 2, tolerance 0.005)"
    # Higher is better for accuracy: the bound is below the base's score.
    choice = EvalBound(task="loom_choice", tolerance=0.25)
    assert bound_failures(summary, "pruned-g1of2-m128of256", [choice]) == []
    [failure] = bound_failures(summary, "pruned-g1of2-m128of256", [choice.model_copy(update={"tolerance": 0.1})])
    assert failure.startswith("loom_choice.acc 0.4 below the bound 0.45")
    # Every bound is judged; a named metric instead of the headline; a model not scored fails each bound.
    both = [perplexity, EvalBound(task="loom_choice", metric="acc_norm", tolerance=0.1)]
    assert len(bound_failures(summary, "pruned-g1of2-m128of256", both)) == 2
    # A negative tolerance asks for better than the base: the same score fails it.
    [failure] = bound_failures(summary, "w8a8-int8", [choice.model_copy(update={"tolerance": -0.01})])
    assert failure.startswith("loom_choice.acc 0.5 below the bound 0.505")
    assert [f.split(":")[0] for f in bound_failures(summary, "bnb-nf4", both)] == [
        "loom_perplexity_code.bits_per_byte",
        "loom_choice.acc_norm",
    ]
    assert "did not score it (the hf backend could not" in bound_failures(summary, "bnb-nf4", both)[0]


def test_a_bound_on_a_task_or_metric_the_stage_did_not_score_names_what_it_scored():
    with pytest.raises(UnknownBoundError, match="no such task; its tasks: loom_perplexity_code, loom_choice"):
        bound_failures(_summary(), "w8a8-int8", [EvalBound(task="loom_next_line", tolerance=0.1)])
    with pytest.raises(UnknownBoundError, match="no metric 'exact_match'; its metrics: acc, acc_norm"):
        bound_failures(_summary(), "w8a8-int8", [EvalBound(task="loom_choice", metric="exact_match", tolerance=0)])
    with pytest.raises(ValueError, match="greater than -1"):
        EvalBound(task="loom_choice", tolerance=-1)


def test_the_served_variant_follows_the_eval_bounds():
    from pipelines.compress.variants import VariantUnavailableError, choose

    summary = _summary()
    front = {
        "w8a8-int8": variant_record("w8a8-int8", "w8a8", 1.004, size=60),
        "pruned-g1of2-m128of256": variant_record("pruned-g1of2-m128of256", "prune", 1.1, size=30),
    }

    def served(tolerance: float) -> str:
        bounds = [EvalBound(task="loom_perplexity_code", tolerance=tolerance)]
        failures = {name: bound_failures(summary, name, bounds) for name in front}
        return choose(front, "cpu", rule="smallest", max_perplexity_increase=0.5, eval_failures=failures)

    assert served(0.25) == "pruned-g1of2-m128of256"  # the smaller, within both bounds
    assert served(0.05) == "w8a8-int8"  # tightened: the pruned model's bits per byte are out
    with pytest.raises(VariantUnavailableError, match=r"keeps the eval bounds; .*w8a8-int8 \(1\.004x; fails loom_"):
        served(0.001)
    bounds = [EvalBound(task="loom_perplexity_code", tolerance=0.05)]
    failures = {name: bound_failures(summary, name, bounds) for name in front}
    with pytest.raises(VariantUnavailableError, match="'pruned-g1of2-m128of256' fails the eval bounds: loom_perp"):
        choose(front, "cpu", name="pruned-g1of2-m128of256", eval_failures=failures)


def test_scoring_through_an_endpoint_without_a_key_or_model_lists_every_problem(monkeypatch, capsys, tmp_path):
    from cluster.cli import EXIT_CONFIG, main
    from tests.conftest import TINY

    monkeypatch.delenv("LOOM_API_KEY", raising=False)
    code = main(
        [
            "eval",
            str(TINY),
            "storage=" + str(tmp_path),
            "--endpoint",
            "127.0.0.1:8000/v1",
            "--ca-file",
            str(tmp_path / "none.pem"),
        ]
    )
    assert code == EXIT_CONFIG
    said = capsys.readouterr().err
    assert "nothing was scored" in said
    for problem in (
        "--model: name the served model",
        "--endpoint: '127.0.0.1:8000/v1' is no URL",
        "none.pem is no file",
        "LOOM_API_KEY: set it",
    ):
        assert problem in said, said
    assert not (tmp_path / "tiny").exists()  # nothing was started or written


def test_scoring_a_run_without_held_out_documents_says_what_to_run(monkeypatch, capsys, tmp_path):
    from cluster.cli import EXIT_CONFIG, main
    from tests.conftest import TINY

    monkeypatch.setenv("LOOM_API_KEY", "loom-secret-key-never-printed")
    code = main(["eval", str(TINY), "storage=" + str(tmp_path), "--endpoint", "http://127.0.0.1:9/v1", "--model", "m"])
    assert code == EXIT_CONFIG
    said = capsys.readouterr().err
    assert "the data stage has not completed" in said and "loom-secret-key" not in said


def test_a_canary_gate_naming_an_eval_bound_rolls_back_once_it_is_tightened(tmp_path):
    from pipelines.artifacts import RECORD, CompressionFront, EvalResults, TrainedModel
    from pipelines.runs import MARKER, RunDir
    from serve.canary import Outcomes, judge
    from serve.config import ServeConfig
    from serve.stage import canary_eval_failures

    # A run whose eval stage scored its trained model (base) and a variant (found by the record beside it).
    run = RunDir(tmp_path / "run")
    stable, candidate = TrainedModel.at(run).path, CompressionFront.at(run).variant_dir("w8a8-int8")
    for directory in (stable, candidate):
        directory.mkdir(parents=True)
    (run.stage_dir("train") / MARKER).write_text("key\n")
    (candidate / RECORD).write_text(variant_record("w8a8-int8", "w8a8", 1.004).model_dump_json())
    results = EvalResults.at(run)
    results.root.mkdir(parents=True)
    results.summary_path.write_text(_summary().model_dump_json())  # paths from another machine: names decide
    (results.root / MARKER).write_text("key\n")
    answered = Outcomes(requests=5, latencies=[0.1] * 5)

    def verdict(tolerance: float, candidate_dir=candidate):
        config = ServeConfig.model_validate(
            {
                "models": {
                    "m": {
                        "canary": {
                            "source": str(candidate_dir),
                            "gate": {
                                "requests": 5,
                                "max_p99_ratio": None,
                                "eval_bounds": [{"task": "loom_perplexity_code", "tolerance": tolerance}],
                            },
                        }
                    }
                }
            }
        )
        failures = canary_eval_failures(config, {"m": stable, "m@canary": candidate_dir}, run)
        return judge(config.models["m"].canary.gate, answered, answered, None, failures["m"])

    assert verdict(0.05).decision == "promote"  # 1% more bits per byte than the stable version
    tightened = verdict(0.005)
    assert tightened.decision == "rollback"
    assert tightened.checks["eval bounds"] == (
        "loom_perplexity_code.bits_per_byte 2.02 above the bound 2.01 (stable 2, tolerance 0.005): FAIL"
    )
    # A candidate the eval stage did not score fails the bound; so does a gate given no eval scores at all.
    unscored = verdict(0.05, candidate_dir=tmp_path / "another-run-model")
    assert unscored.decision == "rollback" and "did not score it" in unscored.checks["eval bounds"]
    gate = (
        ServeConfig.model_validate(
            {
                "models": {
                    "m": {
                        "canary": {
                            "source": "/m",
                            "gate": {"requests": 5, "eval_bounds": [{"task": "t", "tolerance": 0}]},
                        }
                    }
                }
            }
        )
        .models["m"]
        .canary.gate
    )
    assert judge(gate, answered, answered, None, None).checks["eval bounds"].startswith("not judged")


def test_eval_bounds_without_the_eval_stage_are_refused_at_validation():
    from cluster.recipe import ConfigError, load_config
    from tests.conftest import TINY

    bounds = "[{task: loom_choice, tolerance: 0.1}]"
    with pytest.raises(ConfigError) as error:
        load_config(
            TINY,
            [
                "eval.enabled=false",
                f"serve.models={{m: {{variant: {{rule: smallest, eval_bounds: {bounds}}}, "
                f"canary: {{source: /m, gate: {{eval_bounds: {bounds}}}}}}}}}",
            ],
        )
    said = str(error.value)
    assert "serve.models.m.variant.eval_bounds" in said and "serve.models.m.canary.gate.eval_bounds" in said
    assert "eval.enabled is false" in said


def test_an_endpoint_is_checked_before_anything_is_sent():
    from pipelines.eval.endpoint import endpoint_problems

    assert endpoint_problems("https://10.0.0.5:8000/v1", "m", None, 2) == []
    assert endpoint_problems("http://127.0.0.1:8000/v1", "m", None, 1) == []
    said = " ".join(endpoint_problems("http://user:pw@10.0.0.5:8000/v1/completions?key=x", None, None, 0))
    for problem in ("unencrypted", "without credentials", "not /completions", "--model", "--batch-size: 0"):
        assert problem in said, said


def test_an_endpoint_folder_is_one_per_model_id_and_stays_in_the_run(tmp_path):
    from pipelines.eval.endpoint import endpoint_dir
    from pipelines.runs import RunDir

    run = RunDir(tmp_path / "run")
    folders = {model: endpoint_dir(run, model) for model in ("..", ".", "a/b", "a_b", "loom-tiny")}
    assert len(set(folders.values())) == len(folders)
    for folder in folders.values():
        assert folder.resolve().parent == (run.root / "eval" / "endpoint").resolve()


@pytest.mark.parametrize(
    ("status", "body", "said"),
    [
        (401, {"error": "invalid key"}, "refused the key in LOOM_API_KEY (401)"),
        (404, {"detail": "not found"}, "answered 404: is it the API's base"),
        (200, {"data": [{"id": "other"}]}, "serves no model 'loom-tiny'; it serves: other"),
    ],
)
def test_an_endpoint_that_cannot_be_scored_is_said_before_any_task_is_sent(status, body, said):
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from pipelines.eval.endpoint import Endpoint, EndpointError, check_endpoint

    seen = []

    class Answer(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 -- http.server's name
            seen.append((self.path, self.headers["Authorization"]))
            self.send_response(status)
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        with pytest.raises(EndpointError, match=re.escape(said)) as error:
            check_endpoint(Endpoint(url=url, model="loom-tiny", api_key="loom-secret-0123"))
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [("/v1/models", "Bearer loom-secret-0123")] and "loom-secret" not in str(error.value)
    with pytest.raises(EndpointError, match="cannot reach"):
        check_endpoint(Endpoint(url=url, model="loom-tiny", api_key="k"), timeout_s=5)
