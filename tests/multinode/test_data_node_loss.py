"""A worker node lost during the data stage: every process of the node killed while near-dedup runs, after the node
ran tasks of the job. The stage completes on the nodes that remain (Ray retries the lost tasks and rebuilds the lost
blocks from their lineage), and its kept documents, rejects, tokenizer and shards equal an undisturbed run's.

The undisturbed run is the package's own data stage (``tiny_data``, which the chain and the training cases start
from): the disturbed one is the same recipe, so their outputs must be equal. Near-dedup keeps Ray's hash shuffle
under the recipe's sort shuffle (pipelines.data.utils.hash_shuffled), so the node's loss takes aggregator actors
with it as well as tasks. (A larger planted corpus, under Ray's default shuffle: the node-loss benchmark.)"""

from __future__ import annotations

import time

import pytest

from tests.interrupt import inside_step, kept_doc_ids, output_facts, step_states
from tests.multinode.scenarios import JOB_S, submit

pytestmark = pytest.mark.multinode

#: Near-dedup's position among the tiny recipe's steps (00-read first).
TINY_NEAR_DEDUP = 5


def test_the_data_stage_completes_and_equals_an_undisturbed_run_when_a_node_is_lost(cluster, tiny_data, tmp_path):
    _, disturbed = submit(cluster, tmp_path, "data", "disturbed", wait=False)
    in_near_dedup = inside_step("minhash_dedup", TINY_NEAR_DEDUP)
    deadline = time.monotonic() + JOB_S
    while not in_near_dedup(tmp_path / "disturbed"):
        state = cluster.job(disturbed)
        assert time.monotonic() < deadline and state["status"] in ("PENDING", "RUNNING"), state
        time.sleep(0.05)
    # The node lost is one that ran tasks of the job before it went (the State API keeps them): its loss matters.
    # Which worker node ran them is Ray Data's choice; near-dedup lasts tens of seconds, time enough to ask.
    nodes = cluster.node_addresses()
    job_id = cluster.job(disturbed)["job_id"]
    ran_tasks = {nodes.get(task.get("node_id")) for task in cluster.job_tasks(job_id) if task.get("start_time_ms")}
    lost = next((worker for worker in cluster.workers if worker.address in ran_tasks), None)
    assert lost is not None, f"no worker node ran a task of the job before near-dedup: {ran_tasks}"
    try:
        killed_at = time.monotonic()
        lost.kill()
        # The kill landed inside near-dedup: every step before it complete, near-dedup not.
        states = step_states(tmp_path / "disturbed")
        assert states.get(f"{TINY_NEAR_DEDUP:02d}-minhash_dedup") != "complete", states

        ended = cluster.job_ended(disturbed, JOB_S)
        assert ended["status"] == "SUCCEEDED", ended
        print(f"near-dedup lost a node {time.monotonic() - killed_at:.1f} s before the stage completed")

        assert kept_doc_ids(tmp_path / "disturbed") == kept_doc_ids(tiny_data.run_dir)
        assert output_facts(tmp_path / "disturbed") == output_facts(tiny_data.run_dir)
    finally:
        # The node comes back for the tests after this one (a new Ray node at the same address).
        cluster.replace_lost(lost)
