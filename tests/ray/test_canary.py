"""Canary releases and scale to zero against the real vLLM engine on CPU.

One deployment (its own, after the serve tests' endpoint is gone): NEXT is the run's trained model with a canary,
the smallest compressed variant vLLM on CPU serves, answering half of its callers; its gate judges the
candidate's perplexity ratio against a bound no compressed variant meets, so it rolls back once it has answered
GATE_REQUESTS requests. COLD starts with no replica and may go back to none; its engine runs two sequences at once,
so a few requests fill it (the fairness test, on the replica the scale-to-zero test's cold start brought up). The
tests run in file order.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from cluster.chain import run_stage
from tests.conftest import free_port
from tests.helpers import placement_groups, placement_groups_created, wait_for, wait_released

pytestmark = pytest.mark.ray

NEXT, COLD = "loom-next", "loom-cold"
KEYS = [f"loom-canary-key-{i:04d}-abcdef" for i in range(12)]
#: Candidate answers the gate judges; more than the stickiness test sends to the candidate.
GATE_REQUESTS = 40
#: A bound on the candidate's perplexity / the trained model's that no compressed variant meets.
PERPLEXITY_BOUND = 0.5
ASK = {"prompt": "def fibonacci(n):", "max_tokens": 4, "ignore_eos": True}
#: Tokens of each flood request in the fairness test (max_model_len 256).
FLOOD_TOKENS = 240
#: The scale-to-zero test's cold start (seconds), once it brought a replica up: the last test sees it given back.
COLD_STARTED: list[float] = []


def caller_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]  # serve.protection.KeyRing: the key's digest prefix


@pytest.fixture(scope="module")
def releases(ray_cluster, train_done, compress_done, tiny_config, tmp_path_factory):
    from serve.stage import shutdown

    folder = tmp_path_factory.mktemp("canary")
    secrets = folder / "api-keys"
    secrets.write_text("".join(f"{key}\n" for key in KEYS))
    engine = {"dtype": "float32", "max_model_len": 256, "enforce_eager": True}
    serve = tiny_config.serve.model_copy(
        update={
            "models": {
                NEXT: {
                    "engine": engine,
                    "canary": {
                        "variant": {"rule": "smallest", "max_perplexity_increase": 0.05},
                        "weight": 50,
                        "gate": {
                            "requests": GATE_REQUESTS,
                            "max_error_ratio": 0,
                            "max_p99_ratio": None,  # latency on a shared 2-core machine is no verdict to test on
                            "max_perplexity_ratio": PERPLEXITY_BOUND,
                        },
                    },
                },
                COLD: {
                    "engine": {**engine, "max_num_seqs": 2},
                    "autoscaling": {
                        "min_replicas": 0,
                        "max_replicas": 1,
                        "upscale_delay_s": 0,
                        "downscale_delay_s": 5,
                        "metrics_interval_s": 0.5,
                        "look_back_period_s": 2,
                    },
                },
            },
            "protection": {
                "api_keys_env": None,
                "api_keys_file": str(secrets),
                "requests_per_minute": 60_000,
                "burst": 1000,
            },
            "audit": {"path": str(folder / "audit.jsonl")},  # apart from the serve tests' audit log in the run
            "port": free_port(),
            "tls": None,
        }
    )
    config = tiny_config.model_validate({**tiny_config.model_dump(), "serve": serve.model_dump()})
    wait_released(placement_groups(), "the earlier stages' placement groups to be removed before deploying")
    with placement_groups_created() as reserved:
        try:
            record = run_stage("serve", config)
            yield config, record
        finally:
            shutdown()
    wait_released(reserved, "the canary endpoint's placement groups to be removed after serve.shutdown()")


def _completions(config) -> str:
    from serve.stage import base_url

    return base_url(config.serve) + "/completions"


def ask(config, key: str, model: str = NEXT, timeout: float = 120, **fields) -> httpx.Response:
    with httpx.Client(timeout=timeout) as http:
        return http.post(
            _completions(config),
            json={"model": model, **ASK, **fields},
            headers={"Authorization": f"Bearer {key}"},
        )


def canary_status() -> dict:
    from serve.stage import canary_status as status

    return status()[NEXT]


def audit_lines(record) -> list[dict]:
    return [json.loads(line) for line in Path(record["outputs"]["audit_log"]).read_text().splitlines()]


class Load:
    """Every key asking in turn from a few threads until stopped; every answer's send time, key, status and version
    kept. The ingress follows a new weight within a sync (0.5 s): answers sent 2 s after a change show it."""

    def __init__(self, config, threads: int = 3):
        self.config, self.answers, self._stop = config, [], threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)
        self._workers = [self._pool.submit(self._work, i) for i in range(threads)]

    def _work(self, worker: int) -> None:
        sent = 0
        while not self._stop.is_set():
            key = KEYS[(worker + sent * 3) % len(KEYS)]
            sent_at = time.monotonic()  # routing is decided when the request arrives, so answers go by when sent
            answer = ask(self.config, key)
            model = answer.json().get("model") if answer.status_code == 200 else None
            self.answers.append((sent_at, key, answer.status_code, model))
            sent += 1

    def stop(self) -> list[tuple[float, str, int, str | None]]:
        self._stop.set()
        for worker in self._workers:
            worker.result(timeout=300)
        self._pool.shutdown()
        return self.answers


def test_each_caller_keeps_its_version_and_both_versions_answer(releases):
    from serve.canary import route

    config, record = releases
    assert canary_status()["weight"] == 50
    seen = {}
    for key in KEYS:
        versions = {ask(config, key).json()["model"] for _ in range(2)}
        assert versions == {route(NEXT, caller_id(key), 50)}, f"{key} was answered by {versions}"
        seen[key] = versions.pop()
    assert set(seen.values()) == {NEXT, f"{NEXT}@canary"}
    assert canary_status()["status"] == "canary"  # fewer than GATE_REQUESTS candidate answers so far


def test_the_gate_rolls_the_candidate_back_under_load_without_a_failed_request(releases):
    config, record = releases
    ratio = canary_status()["perplexity_ratio"]
    assert ratio is not None and ratio > PERPLEXITY_BOUND, "the candidate's measured perplexity ratio is the verdict"
    load = Load(config)
    try:
        wait_for(lambda: canary_status()["status"] == "rolled back", 240, "the gate to roll the candidate back")
        decided = time.monotonic()
        time.sleep(4)  # the ingress follows within a sync; then every caller is answered by the stable version
    finally:
        answers = load.stop()
    assert answers and all(status == 200 for _, _, status, _ in answers), [a for a in answers if a[2] != 200][:5]
    assert {model for at, _, _, model in answers if at > decided + 2} == {NEXT}
    assert canary_status()["candidate_requests"] >= GATE_REQUESTS
    [event] = [line for line in audit_lines(record) if line["route"] == "canary"]
    assert event["model"] == NEXT and event["caller"] == "gate"
    assert event["reason"].startswith("rollback to weight 0") and "perplexity / stable's" in event["reason"]


def test_an_operator_promotes_and_rolls_back_under_load_without_a_failed_request(releases, capsys):
    from cluster.cli import main

    config, record = releases
    load = Load(config)
    try:
        assert main(["serve", "promote", NEXT]) == 0
        promoted = time.monotonic()
        time.sleep(4)
        assert main(["serve", "rollback", NEXT]) == 0
        rolled_back = time.monotonic()
        time.sleep(4)
    finally:
        answers = load.stop()
    assert all(status == 200 for _, _, status, _ in answers), [a for a in answers if a[2] != 200][:5]
    assert {m for at, _, _, m in answers if promoted + 2 < at < rolled_back - 1} == {f"{NEXT}@canary"}
    assert {m for at, _, _, m in answers if at > rolled_back + 2} == {NEXT}
    operator = [line for line in audit_lines(record) if line["route"] == "canary" and line["caller"] == "operator"]
    assert [line["reason"].split(":")[0] for line in operator] == ["promote to weight 100", "rollback to weight 0"]
    assert main(["serve", "promote", COLD]) == 1
    assert f"'{COLD}' has no canary" in capsys.readouterr().err


def _cold_replicas() -> int:
    from ray import serve

    from serve.stage import APP_NAME

    deployments = serve.status().applications[APP_NAME].deployments
    [name] = [name for name in deployments if COLD in name]
    return sum(count for state, count in deployments[name].replica_states.items() if str(state).endswith("RUNNING"))


def test_a_model_scales_to_zero_and_its_first_request_waits_for_a_replica(releases):
    config, _ = releases
    wait_for(lambda: _cold_replicas() == 0, 120, f"{COLD} to have no replica while idle")
    started = time.monotonic()
    answer = ask(config, KEYS[0], COLD, timeout=300)
    cold_start = time.monotonic() - started
    assert answer.status_code == 200, answer.text[:300]
    assert answer.json()["model"] == COLD and _cold_replicas() == 1
    COLD_STARTED.append(cold_start)
    print(f"cold start of {COLD}: {cold_start:.1f} s")


def test_a_flooding_key_leaves_an_engine_slot_to_another_key(releases):
    """COLD's engine (warm: the cold start above brought a replica up) runs two sequences: one key's eight
    concurrent long requests get one of them (the other is reserved) and wait at the ingress. Another key's short
    request, sent after them, starts at once in the reserved slot and finishes before every flood request but the
    one already running; first come, first served would put it behind all seven waiting."""
    config, _ = releases
    finished: list[str] = []
    lock = threading.Lock()

    def flood_or_light(key: str, name: str, tokens: int) -> None:
        answer = ask(config, key, COLD, timeout=600, max_tokens=tokens)
        assert answer.status_code == 200, answer.text[:300]
        with lock:
            finished.append(name)

    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        # Long enough that on a warm engine, one at a time, the flood outlasts the sending of the light request.
        flood = [pool.submit(flood_or_light, KEYS[0], f"flood-{i}", FLOOD_TOKENS) for i in range(8)]
        wait_for(lambda: sum(f.running() for f in flood) == 8, 30, "the flood's requests to be sent")
        time.sleep(1.0)  # they reach the ingress
        light = pool.submit(flood_or_light, KEYS[1], "light", 4)
        with lock:
            done_before = len(finished)
        # Requests still waiting behind the running one when the light one came: the test needs a few.
        assert done_before <= 4, f"most of the flood ended before the light request was sent: {finished}"
        for future in (*flood, light):
            future.result(timeout=900)
    # Behind at most the flood request running in its slot when it came.
    assert finished.index("light") <= done_before + 1, (done_before, finished)
    print(f"fairness: finished {finished}, {done_before} of the flood before the light request was sent")
    # A request may not pick its own priority.
    chosen = httpx.post(
        _completions(config),
        json={"model": COLD, "prompt": "x", "priority": -9},
        headers={"Authorization": f"Bearer {KEYS[1]}"},
        timeout=60,
    )
    assert chosen.status_code == 400 and chosen.json()["error"]["code"] == "priority"


def test_an_idle_model_gives_its_replica_back(releases):
    """Last: COLD, idle after the fairness test, goes back to no replica (a later request would start one as the
    scale-to-zero test's did)."""
    if not COLD_STARTED:
        pytest.skip("follows the scale-to-zero test, whose cold start did not bring a replica up here")
    wait_for(lambda: _cold_replicas() == 0, 120, f"{COLD} to give its replica back once idle")
