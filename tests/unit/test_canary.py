"""Canary releases without Ray: sticky routing, the gate's verdicts, the controller's state, the versions deployed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve.canary import Canaries, Outcomes, judge, perplexity_ratio, route
from serve.config import CanaryGate, ServeConfig


def test_routing_is_sticky_even_and_monotone_in_the_weight():
    callers = [f"caller-{i}" for i in range(2000)]
    at_30 = {c: route("m", c, 30) for c in callers}
    assert at_30 == {c: route("m", c, 30) for c in callers}  # the same caller, the same version
    share = sum(v == "m@canary" for v in at_30.values()) / len(callers)
    assert 0.26 < share < 0.34
    at_60 = {c: route("m", c, 60) for c in callers}
    assert all(at_60[c] == "m@canary" for c, v in at_30.items() if v == "m@canary")  # raising only adds callers
    assert {route("m", c, 0) for c in callers} == {"m"} and {route("m", c, 100) for c in callers} == {"m@canary"}


def _answers(requests: int, errors: int = 0, latency: float = 0.1) -> Outcomes:
    return Outcomes(requests=requests, errors=errors, latencies=[latency] * requests)


def test_the_gate_waits_for_its_requests_then_promotes_when_every_bound_holds():
    gate = CanaryGate(requests=20, max_error_ratio=0.05, max_p99_ratio=1.5, max_perplexity_ratio=1.1)
    assert judge(gate, _answers(19), _answers(50), 1.0) is None
    verdict = judge(gate, _answers(20), _answers(50), 1.05)
    assert verdict.decision == "promote", verdict.reason


@pytest.mark.parametrize(
    ("candidate", "stable", "ratio", "failing"),
    [
        (_answers(20, errors=2), _answers(50), 1.0, "error ratio"),
        (_answers(20, latency=0.5), _answers(50, latency=0.1), 1.0, "p99 latency / stable's"),
        (_answers(20), _answers(50), 1.2, "perplexity / stable's"),
        (_answers(20), _answers(50), None, "perplexity / stable's"),  # not measured fails
    ],
)
def test_the_gate_rolls_back_naming_the_bound_that_failed(candidate, stable, ratio, failing):
    gate = CanaryGate(requests=20, max_error_ratio=0.05, max_p99_ratio=1.5, max_perplexity_ratio=1.1)
    verdict = judge(gate, candidate, stable, ratio)
    assert verdict.decision == "rollback"
    assert verdict.checks[failing].endswith("FAIL")
    assert sum(text.endswith("FAIL") for text in verdict.checks.values()) == 1


def test_latencies_are_compared_only_with_enough_stable_answers():
    gate = CanaryGate(requests=5, max_p99_ratio=1.5)
    verdict = judge(gate, _answers(5, latency=9.0), _answers(3, latency=0.1), None)
    assert verdict.decision == "promote" and "not compared" in verdict.checks["p99 latency / stable's"]


def test_the_controller_decides_once_and_keeps_its_events_for_the_audit():
    canaries = Canaries(
        {"m": {"weight": 50, "gate": {"requests": 10, "max_perplexity_ratio": 1.0}, "perplexity_ratio": 1.3}}
    )
    canaries.record({"m": {"candidate": _answers(6), "stable": _answers(6)}})
    assert canaries.weights() == {"m": 50}
    canaries.record({"m": {"candidate": _answers(6)}})
    assert canaries.weights() == {"m": 0.0}
    [event] = canaries.take_events()
    assert event["decision"] == "rollback" and event["by"] == "gate" and "1.3 <= 1: FAIL" in event["reason"]
    canaries.record({"m": {"candidate": _answers(100)}})  # decided: the window is closed
    assert canaries.take_events() == [] and canaries.status()["m"]["candidate_requests"] == 12
    canaries.decide("m", "promote")
    assert canaries.weights() == {"m": 100.0} and canaries.take_events()[0]["by"] == "operator"
    with pytest.raises(KeyError, match="has no canary"):
        canaries.decide("other", "promote")


def test_a_canary_is_one_more_version_with_the_models_settings():
    config = ServeConfig.model_validate(
        {"models": {"m": {"max_ongoing_requests": 5, "canary": {"source": "/models/next", "weight": 20}}, "n": {}}}
    )
    versions = config.versions
    assert list(versions) == ["m", "m@canary", "n"]
    assert versions["m@canary"].source == "/models/next" and versions["m@canary"].max_ongoing_requests == 5
    assert versions["m@canary"].canary is None
    with pytest.raises(ValidationError, match="either source or variant"):
        ServeConfig.model_validate({"models": {"m": {"canary": {"weight": 20}}}})


def test_the_perplexity_ratio_comes_from_the_lineage():
    stable = {"source": "/run/train/model", "eval": {"val_perplexity": 10.0}}
    variant = {"source": "/v", "compression": {"base_model": "/run/train/model", "ratios": {"perplexity": 1.02}}}
    assert perplexity_ratio(stable, variant) == 1.02
    assert perplexity_ratio(stable, {"source": "/other", "eval": {"val_perplexity": 12.0}}) == pytest.approx(1.2)
    assert perplexity_ratio(stable, {"source": "/outside"}) is None


def test_the_app_deploys_each_version_and_a_fixed_ingress_count_when_asked(tmp_path):
    from serve.app import ServeAppArgs, canaries, ingress_options

    config = ServeConfig.model_validate(
        {
            "models": {"m": {"canary": {"source": str(tmp_path / "next"), "weight": 25, "gate": None}}},
            "ingress_replicas": 3,
        }
    )
    args = ServeAppArgs(
        serve_config=config, model_sources={"m": str(tmp_path / "m"), "m@canary": str(tmp_path / "next")}
    )
    lineage = {version: {"source": source} for version, source in args.model_sources.items()}
    assert canaries(args, lineage) == {
        "m": {"weight": 25, "gate": None, "perplexity_ratio": None, "eval_failures": None}
    }
    with pytest.raises(ValidationError, match="m@canary"):
        ServeAppArgs(serve_config=config, model_sources={"m": str(tmp_path / "m")})
    assert ingress_options(1) == {}  # Ray's default: one replica, to zero with the models
    assert ingress_options(3)["autoscaling_config"] == {"min_replicas": 3, "initial_replicas": 3, "max_replicas": 3}
    # One a node where there are nodes enough, so that no node's loss takes every ingress with it.
    assert "max_replicas_per_node" not in ingress_options(3, nodes=2)
    assert ingress_options(3, nodes=3)["max_replicas_per_node"] == 1
