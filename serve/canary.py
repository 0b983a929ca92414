"""Canary releases: a model id answered by two versions, a weight of its callers on the candidate.

- Routing is sticky: a caller's place in ``[0, 100)`` is a hash of the model and the caller, and the candidate
  answers the callers below the weight, so a caller keeps its version while the weight stays, and raising
  the weight only moves callers from the stable version to the candidate.
- The weight and the gate's window live in one ``CanaryController`` deployment of the app, so every ingress
  replica routes alike and the gate sees all of the candidate's answers; ingress replicas sync with it
  every ``SYNC_S`` (their outcomes up, the weights down).
- The gate (``serve.models.<id>.canary.gate``) decides once the candidate has answered ``requests``
  requests: promote (weight 100) if every bound holds, else roll back (weight 0). ``loom serve promote`` and
  ``rollback`` decide by hand. Every change is an event the ingress writes to the audit log.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from serve.config import CanaryGate, canary_id

log = logging.getLogger(__name__)
#: Seconds between an ingress replica's syncs with the controller.
SYNC_S = 0.5
#: The stable version's answers the gate needs in its window to compare p99 latencies.
MIN_STABLE_SAMPLES = 10


def caller_place(model_id: str, caller: str) -> float:
    """Where a caller stands for a model, in [0, 100): fixed for the pair, spread evenly over callers."""
    digest = hashlib.sha256(f"{model_id}\0{caller}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def route(model_id: str, caller: str, weight: float) -> str:
    """The version that answers ``caller`` for ``model_id`` at ``weight`` percent on the candidate."""
    return canary_id(model_id) if caller_place(model_id, caller) < weight else model_id


def p99(latencies: list[float]) -> float | None:
    if not latencies:
        return None
    ordered = sorted(latencies)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


@dataclass
class Outcomes:
    """What one version answered in the gate's window."""

    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Outcomes) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.latencies.extend(other.latencies)


@dataclass(frozen=True)
class Verdict:
    decision: str  # "promote" | "rollback"
    checks: dict[str, str]  # check -> what was measured against which bound

    @property
    def reason(self) -> str:
        return "; ".join(f"{name}: {text}" for name, text in self.checks.items())


def judge(
    gate: CanaryGate,
    candidate: Outcomes,
    stable: Outcomes,
    perplexity_ratio: float | None,
    eval_failures: list[str] | None = None,
) -> Verdict | None:
    """The gate's decision once the candidate has answered ``gate.requests`` requests (None before).
    ``eval_failures``: the gate's eval bounds the candidate fails against the stable version (the serve stage
    judges them from the run's eval scores when it deploys)."""
    if candidate.requests < gate.requests:
        return None
    checks: dict[str, str] = {}
    failed = False

    def check(name: str, value: float | None, bound: float, unit: str = "") -> None:
        nonlocal failed
        if value is None:
            failed = True
            checks[name] = f"not measured (bound {bound:g}{unit}): FAIL"
            return
        ok = value <= bound
        failed |= not ok
        checks[name] = f"{value:.4g}{unit} <= {bound:g}{unit}: {'ok' if ok else 'FAIL'}"

    check("error ratio", candidate.errors / candidate.requests, gate.max_error_ratio)
    candidate_p99 = p99(candidate.latencies)
    if gate.max_p99_s is not None:
        check("p99 latency", candidate_p99, gate.max_p99_s, " s")
    if gate.max_p99_ratio is not None:
        stable_p99 = p99(stable.latencies)
        if len(stable.latencies) >= MIN_STABLE_SAMPLES and stable_p99 and candidate_p99 is not None:
            check("p99 latency / stable's", candidate_p99 / stable_p99, gate.max_p99_ratio)
        else:
            checks["p99 latency / stable's"] = (
                f"not compared: the stable version answered {len(stable.latencies)} requests in the window "
                f"(needs {MIN_STABLE_SAMPLES})"
            )
    if gate.max_perplexity_ratio is not None:
        check("perplexity / stable's", perplexity_ratio, gate.max_perplexity_ratio)
    if gate.eval_bounds:
        failed |= eval_failures is None or bool(eval_failures)
        if eval_failures is None:
            checks["eval bounds"] = "not judged (the deployment was given no eval scores): FAIL"
        else:
            checks["eval bounds"] = f"{'; '.join(eval_failures)}: FAIL" if eval_failures else "kept: ok"
    return Verdict("rollback" if failed else "promote", checks)


@dataclass
class CanaryState:
    """One model's canary: its weight, how it got it, and the gate's window while it is undecided."""

    weight: float
    gate: CanaryGate | None
    perplexity_ratio: float | None
    eval_failures: list[str] | None = None
    status: str = "canary"  # canary | promoted | rolled back
    candidate: Outcomes = field(default_factory=Outcomes)
    stable: Outcomes = field(default_factory=Outcomes)


@dataclass(frozen=True)
class CanaryEvent:
    """A change of a canary's weight, for the audit log."""

    time: float
    model: str
    decision: str
    weight: float
    by: str  # "gate" or "operator"
    reason: str


class Canaries:
    """Every canary of an app, without Ray: the weights, the gate's windows, the events not yet audited."""

    def __init__(self, canaries: dict[str, dict[str, Any]]):
        self.states = {
            model_id: CanaryState(
                weight=found["weight"],
                gate=CanaryGate.model_validate(found["gate"]) if found.get("gate") else None,
                perplexity_ratio=found.get("perplexity_ratio"),
                eval_failures=found.get("eval_failures"),
            )
            for model_id, found in canaries.items()
        }
        self.events: list[CanaryEvent] = []

    def weights(self) -> dict[str, float]:
        return {model_id: state.weight for model_id, state in self.states.items()}

    def record(self, outcomes: dict[str, dict[str, Outcomes]]) -> None:
        """Add an ingress replica's outcomes (model -> "candidate"/"stable" -> what they answered) to the open
        windows, and decide where the gate can."""
        for model_id, versions in outcomes.items():
            state = self.states.get(model_id)
            if state is None or state.status != "canary" or state.gate is None:
                continue
            for side, seen in versions.items():
                getattr(state, side).add(seen)
            verdict = judge(state.gate, state.candidate, state.stable, state.perplexity_ratio, state.eval_failures)
            if verdict is not None:
                self._set(model_id, verdict.decision, "gate", verdict.reason)

    def decide(self, model_id: str, decision: str, by: str = "operator") -> CanaryEvent:
        if model_id not in self.states:
            known = ", ".join(sorted(self.states)) or "none"
            raise KeyError(f"{model_id!r} has no canary (models with one: {known})")
        if decision not in ("promote", "rollback"):
            raise ValueError(f"a canary is promoted or rolled back, not {decision!r}")
        return self._set(model_id, decision, by, f"{decision} asked by the {by}")

    def _set(self, model_id: str, decision: str, by: str, reason: str) -> CanaryEvent:
        state = self.states[model_id]
        state.weight = 100.0 if decision == "promote" else 0.0
        state.status = "promoted" if decision == "promote" else "rolled back"
        event = CanaryEvent(time.time(), model_id, decision, state.weight, by, reason)
        self.events.append(event)
        return event

    def take_events(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return [asdict(event) for event in events]

    def status(self) -> dict[str, dict[str, Any]]:
        return {
            model_id: {
                "weight": state.weight,
                "status": state.status,
                "candidate_requests": state.candidate.requests,
                "candidate_errors": state.candidate.errors,
                "stable_requests": state.stable.requests,
                "perplexity_ratio": state.perplexity_ratio,
            }
            for model_id, state in self.states.items()
        }


class CanaryController:
    """The app's one holder of canary weights (a Serve deployment of one replica, see ``serve.app``)."""

    def __init__(self, canaries: dict[str, dict[str, Any]]):
        self.canaries = Canaries(canaries)

    async def sync(self, outcomes: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        """An ingress replica's outcomes since its last sync in; the weights and the events to audit out."""
        self.canaries.record(
            {model: {side: Outcomes(**seen) for side, seen in sides.items()} for model, sides in outcomes.items()}
        )
        return {"weights": self.canaries.weights(), "events": self.canaries.take_events()}

    async def decide(self, model_id: str, decision: str) -> dict[str, Any]:
        """The event of an operator's decision, or ``{"error": why not}``."""
        try:
            return asdict(self.canaries.decide(model_id, decision))
        except (KeyError, ValueError) as err:
            return {"error": str(err.args[0])}

    async def status(self) -> dict[str, dict[str, Any]]:
        return self.canaries.status()


def perplexity_ratio(stable: dict[str, Any], candidate: dict[str, Any]) -> float | None:
    """Candidate's held-out perplexity over the stable version's, from their lineage (``ModelLineage`` dumps):
    a compressed variant of the stable model carries its own ratio (both measured in one engine); two trained
    models compare their train stages' held-out perplexity. None when neither measurement is there."""
    compression = candidate.get("compression")
    if compression and compression.get("base_model") == stable.get("source"):
        return compression["ratios"].get("perplexity")
    ours, theirs = candidate.get("eval", {}).get("val_perplexity"), stable.get("eval", {}).get("val_perplexity")
    if ours and theirs:
        return ours / theirs
    return None


class Releases:
    """An ingress replica's side of the canaries: routes callers by the weights it last synced, gathers the
    outcomes of requests to models with a canary, and syncs with the controller every ``SYNC_S``."""

    def __init__(self, weights: dict[str, float], controller: Any, weight_gauge: Callable[[str, float], None]):
        self.weights = dict(weights)
        self._controller = controller
        self._gauge = weight_gauge
        self._pending: dict[str, dict[str, Outcomes]] = {}
        self._task: asyncio.Task[None] | None = None
        for model_id, weight in self.weights.items():
            weight_gauge(model_id, weight)

    def start(self, audit_event: Callable[[dict[str, Any]], None]) -> None:
        """Begin syncing (from the first request: a replica's constructor runs outside its event loop)."""
        if self._task is None and self._controller is not None:
            self._task = asyncio.get_running_loop().create_task(self._sync_forever(audit_event))

    def route(self, model_id: str, state: Any) -> str:
        """The version that answers this request (``state``: the request's, with its ``caller``)."""
        weight = self.weights.get(model_id)
        if weight is None:
            return model_id
        version = route(model_id, state.caller.id, weight)
        state.canary = (model_id, "stable" if version == model_id else "candidate")
        return version

    def outcome(self, state: Any, status: int, reason: str | None, latency_s: float) -> None:
        routed = getattr(state, "canary", None)
        if routed is None:
            return
        state.canary = None
        model_id, side = routed
        seen = self._pending.setdefault(model_id, {}).setdefault(side, Outcomes())
        seen.requests += 1
        seen.errors += status >= 500 or reason == "engine"
        seen.latencies.append(latency_s)

    async def _sync_forever(self, audit_event: Callable[[dict[str, Any]], None]) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            pending, self._pending = self._pending, {}
            try:
                answer = await self._controller.sync.remote(
                    {model: {side: asdict(seen) for side, seen in sides.items()} for model, sides in pending.items()}
                )
            except Exception as err:  # the controller restarting: keep the outcomes for the next sync
                log.warning("canary sync failed (%s); routing by the last weights", type(err).__name__)
                for model, sides in pending.items():
                    for side, seen in sides.items():
                        self._pending.setdefault(model, {}).setdefault(side, Outcomes()).add(seen)
                continue
            for model_id, weight in answer["weights"].items():
                self.weights[model_id] = weight
                self._gauge(model_id, weight)
            for event in answer["events"]:
                log.info(
                    "canary %s: %s to weight %g (%s)",
                    event["model"],
                    event["decision"],
                    event["weight"],
                    event["reason"],
                )
                audit_event(event)
