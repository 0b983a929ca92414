"""Interrupted at scale, small: `kill -9` of the `loom data` driver while it computes near-dedup, then `loom data`
again. The rerun reads back the steps finished before the kill instead of computing them, and its kept documents,
rejects, tokenizer and packed shards equal an uninterrupted run's (tests/interrupt.py has the machinery; the
million-document benchmark calls the same)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.interrupt import inside_step, kept_doc_ids, output_facts, run_killed_then_resumed, run_uninterrupted
from tests.planted_corpus import planted_corpus

pytestmark = pytest.mark.ray

STEPS = (
    "[{type: normalize}, {type: length, min_chars: 40}, {type: exact_dedup, num_partitions: 2},"
    " {type: minhash_dedup, num_partitions: 2}]"
)
#: Where near-dedup sits among the steps (00-read comes first), and the steps complete before it.
NEAR_DEDUP = 4
BEFORE_NEAR_DEDUP = ["00-read", "01-normalize", "02-length", "03-exact_dedup"]
RUN_S = 300


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A data-only recipe over about 2,000 short documents: planted near-duplicates, exact copies, too-short ones.
    Its model (head size 16) is one vLLM on CPU cannot serve: the whole chain is refused, `loom data` runs."""
    root = tmp_path_factory.mktemp("interrupted")
    corpus = planted_corpus(bases=250, variants_per_base=2, uniques=1000, words=80, seed=24)
    texts = [text for _, text in corpus.documents]
    texts += texts[:200] + ["too short to keep"] * 20
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    path = root / "recipe.yaml"
    path.write_text(
        f"storage: {root}\nrun_name: whole\n"
        f"data:\n  sources:\n    - {{format: jsonl, path: {root / 'corpus.jsonl'}, name: planted}}\n"
        f"  steps: {STEPS}\n  vocab_size: 300\n  seq_len: 64\n  tokenize_actors: 1\n  shuffle: sort\n"
        "train:\n  model: {hidden_size: 64, num_heads: 4, num_kv_heads: 4}\n"
    )
    return path, len(corpus.clusters) * 2


def test_a_driver_killed_in_near_dedup_resumes_after_the_last_finished_step(ray_cluster, recipe):
    from cluster.cli import main

    path, planted_drops = recipe
    storage = path.parent
    assert main(["validate", str(path)]) == 2  # the whole chain would serve the model: refused
    # The drivers join this test's cluster, as `loom data` joins a running cluster (RAY_ADDRESS).
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    command = [sys.executable, "-m", "cluster", "data", str(path)]

    # The uninterrupted run beside the killed one, on the same cluster: a job of its own, which the kill's checks
    # (the killed driver's processes and job) leave out.
    with concurrent.futures.ThreadPoolExecutor(1) as beside:
        uninterrupted = beside.submit(run_uninterrupted, command, env, storage / "whole", 2 * RUN_S, cwd=REPO_ROOT)
        killed = storage / "killed"
        report = run_killed_then_resumed(
            [*command, "run_name=killed"], env, killed, inside_step("minhash_dedup", NEAR_DEDUP), 2 * RUN_S,
            cwd=REPO_ROOT,
        )  # fmt: skip
        whole = uninterrupted.result()  # its own failure, if any, raised here
    assert whole["returncode"] == 0, whole["output"][-4000:]
    summary = {key: value for key, value in report.items() if key != "rerun_output"}
    # The kill landed in near-dedup: every step before it complete, near-dedup not.
    assert report["killed"] and report["first_returncode"] == -signal.SIGKILL, summary
    assert report["complete_at_kill"] == BEFORE_NEAR_DEDUP, summary
    assert report["states_at_kill"].get(f"{NEAR_DEDUP:02d}-minhash_dedup") != "complete", summary
    # Ray ended the killed job's processes (fate-sharing with its driver): none was left to be killed by hand.
    assert report["job_id"] is not None and not report["left_running"], summary

    assert report["rerun_returncode"] == 0, report["rerun_output"][-4000:]
    # The finished steps were read back, not computed again: their files are the ones the killed driver wrote.
    assert report["resumed"] == BEFORE_NEAR_DEDUP and not report["recomputed"], summary
    assert report["states_after"] == {name: "complete" for name in [*BEFORE_NEAR_DEDUP, "04-minhash_dedup"]}
    assert not report["leftover_partials"], summary

    # The same documents kept, the same rejects, tokenizer and packed shards (rows in order) as without the kill.
    assert kept_doc_ids(killed) == kept_doc_ids(storage / "whole")
    facts = output_facts(killed)
    assert facts == output_facts(storage / "whole")
    stats = json.loads((killed / "data" / "stats.json").read_text())
    assert stats["drops_by_step"]["minhash_dedup"] >= 0.95 * planted_drops, stats["drops_by_step"]
    assert facts["rejects"]["rows"] == stats["documents_in"] - stats["documents_out"]  # written once, not twice
    assert facts["train"]["rows"] == stats["sequences"]["train"] > 0
