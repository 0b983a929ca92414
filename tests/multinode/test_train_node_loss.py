"""A node lost during training with a fixed worker count (three workers, one a node, STRICT_SPREAD):

- the node comes back within ``train.wait_for_nodes_s``: training resumes from its last checkpoint at the same
  data position, and every step's loss equals an undisturbed run's;
- it does not: the stage stops within the bound with a message that says why and what to do.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO_ROOT, SMALL_MODEL, TINY
from tests.helpers import wait_for

pytestmark = pytest.mark.multinode

STEPS = 16
CHECKPOINT_EVERY = 4
JOB_S = 900  # a ceiling for a loaded 2-core machine


def submit(cluster, storage, stage: str, run_name: str, *overrides: str, wait: bool = True):
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "submit", stage, str(TINY), f"storage={storage}", f"run_name={run_name}",
         "data.max_documents=150", *SMALL_MODEL, "tune.enabled=false", *overrides, "--address", cluster.dashboard,
         *([] if wait else ["--no-wait"])],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=JOB_S, env=cluster.env,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    return output, re.search(r"\[loom\] submitted (\S+) to ", output).group(1)


def train_overrides(wait_for_nodes_s: float) -> list[str]:
    return [
        "train.num_workers=3", "train.placement_strategy=STRICT_SPREAD", f"train.max_steps={STEPS}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}", "train.log_every=1", "train.eval_every=8",
        f"train.wait_for_nodes_s={wait_for_nodes_s}",
    ]  # fmt: skip


def steps(run_dir) -> list[dict]:
    path = run_dir / "train" / "metrics.jsonl"
    if not path.is_file():
        return []
    return [row for row in map(json.loads, path.read_text().splitlines()) if "loss" in row]


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    """One data stage, copied into a run per case (the same shards), and the undisturbed training."""
    storage = tmp_path_factory.mktemp("train-node-loss")
    submit(cluster, storage, "data", "base")
    for name in ("undisturbed", "resumed", "stopped"):
        shutil.copytree(storage / "base", storage / name)
    submit(cluster, storage, "train", "undisturbed", *train_overrides(120))
    return storage


def test_training_resumes_exactly_when_the_lost_node_returns(cluster, runs):
    reference = {row["step"]: row["loss"] for row in steps(runs / "undisturbed")}
    assert sorted(reference) == list(range(1, STEPS + 1)), sorted(reference)
    lost = cluster.workers[0]
    _, submission = submit(cluster, runs, "train", "resumed", *train_overrides(120), wait=False)
    wait_for(lambda: len(steps(runs / "resumed")) >= CHECKPOINT_EVERY + 2, JOB_S, "training past its first checkpoint")
    lost.kill()
    killed_at = time.time()
    wait_for(lambda: lost.address not in cluster.alive_node_addresses(), 120, "Ray to declare the node dead")
    cluster.start_worker(lost, cluster.worker_cpus)
    final = cluster.job_ended(submission, JOB_S)
    assert final["status"] == "SUCCEEDED", final

    history = steps(runs / "resumed")
    after = [row for row in history if row["reported_at"] > killed_at]
    assert after, "no step was reported after the node's loss"
    # It went on from a checkpoint taken before the kill (the step after one; steps past it are reported again),
    # with the same data and losses.
    before = max(row["step"] for row in history if row["reported_at"] <= killed_at)
    assert (after[0]["step"] - 1) % CHECKPOINT_EVERY == 0 and after[0]["step"] <= before + 1, (after[0], before)
    last = {row["step"]: row["loss"] for row in history}  # a step reported twice: its last report wins
    assert sorted(last) == sorted(reference)
    assert all(abs(last[step] - reference[step]) <= 1e-5 for step in reference), {
        step: (last[step], reference[step]) for step in reference if abs(last[step] - reference[step]) > 1e-5
    }
    print(f"training progressed again {after[0]['reported_at'] - killed_at:.1f} s after its node's loss")


def test_training_stops_and_says_why_when_the_node_stays_lost(cluster, runs):
    wait_s = 30
    lost = cluster.workers[1]
    _, submission = submit(cluster, runs, "train", "stopped", *train_overrides(wait_s), wait=False)
    wait_for(lambda: len(steps(runs / "stopped")) >= 2, JOB_S, "training to start")
    lost.kill()
    killed_at = time.monotonic()
    try:
        final = cluster.job_ended(submission, JOB_S)
        stopped_after_s = time.monotonic() - killed_at
        assert final["status"] == "FAILED", final
        logs = cluster.get(f"/api/jobs/{submission}/logs")["logs"]
        assert f"found no room on the cluster within train.wait_for_nodes_s={wait_s} s" in logs, logs[-3000:]
        assert "run the train stage again once the nodes are back" in logs
        # Detection (Ray's node health checks, Train's worker poll) and the bounded wait, then no longer.
        assert stopped_after_s < wait_s + 120, stopped_after_s
        print(f"training stopped {stopped_after_s:.1f} s after its node's loss (wait_for_nodes_s={wait_s})")
    finally:
        wait_for(lambda: lost.address not in cluster.alive_node_addresses(), 120, "Ray to declare the node dead")
        cluster.start_worker(lost, cluster.worker_cpus)
        wait_for(lambda: lost.address in cluster.alive_node_addresses(), 300, "the lost node to rejoin")
