"""One local Ray cluster for the tests in this folder, and one tiny run built stage by stage.

The run uses planted inputs next to a slice of the standard library: exact
duplicates, a too-short document, a record without a text field, malformed JSON
lines, a line and a file of invalid UTF-8 and a gzip-compressed file, so the data
stage's rejects can be checked.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import yaml

from cluster.recipe import LoomConfig, load_config
from tests.conftest import REPO_ROOT, SMALL_MODEL, TINY, free_port
from tests.helpers import RELEASE_S, kill_after_first_finished_trial, placement_groups_created, wait_for

PLANTED_TEXT = "A planted document that appears twice with identical content, so exact dedup drops one copy."


@pytest.fixture(scope="package")
def ray_cluster():
    import ray

    from cluster.config import ClusterConfig
    from cluster.connect import connect

    # Logical CPUs, for Ray's scheduling: the serve tests' endpoint reserves 2 per vLLM replica (Ray Serve LLM
    # merges the replica's CPU into its engine's bundle), 8 for three models and a second replica of one.
    connect(ClusterConfig(num_cpus=10))  # on a dashboard port of its own (connect: Ray's State API)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="package")
def planted_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    records = [
        {"text": PLANTED_TEXT},
        {"text": PLANTED_TEXT},
        {"text": "too short"},
        {"body": "this record has no text field at all, so it cannot become a document"},
    ]
    malformed = [b"{not json at all", b"[1, 2, 3]", b'{"text": "bad byte \xff in a line"}']
    (root / "planted.jsonl").write_bytes(
        "".join(json.dumps(r) + "\n" for r in records).encode() + b"\n".join(malformed)
    )
    with gzip.open(root / "compressed.jsonl.gz", "wt") as handle:
        for i in range(2):
            handle.write(
                json.dumps({"text": f"Compressed record number {i}, long enough to pass the length filter."}) + "\n"
            )
    texts = root / "texts"
    texts.mkdir()
    (texts / "good.txt").write_text("A plain text document that is long enough to be kept by every filter.\n")
    (texts / "bad.txt").write_bytes(b"invalid utf-8 follows: \xff\xfe\xfa and more text to be long enough")
    return root


#: A learning rate in the tests' search space that makes the loss blow up within two steps.
DIVERGING_LR = 0.5


#: One candidate of each kind, so four trials cover them all: a family vLLM on CPU cannot serve (measured
#: in transformers), one it serves, pruning, and a one-layer student. The model is barely trained: any of
#: them moves its perplexity by well under the 5 % bound.
COMPRESS = [
    "compress.enabled=true",
    "compress.families=[bnb_int8, w8a8, prune, distill]",
    "compress.num_trials=4",
    "compress.try_first=[{family: bnb_int8}, {family: w8a8},"
    " {family: prune, heads_kept: 0.5, mlp_kept: 0.5, then_quantize: none},"
    " {family: distill, layers_kept: 0.5, width_kept: 1.0}]",
    "compress.distill={steps: 4, layers_kept: {low: 0.5, high: 0.5}, width_kept: {low: 1.0, high: 1.0}}",
    "compress.prune.recovery_steps=2",
    "compress.max_perplexity_increase=0.05",
    "compress.eval_rows=8",
    "compress.calibration_rows=4",
    "compress.speed={requests: 3, prompt_tokens: 8, new_tokens: 8}",
]


@pytest.fixture(scope="package")
def tiny_config(tmp_path_factory, planted_sources) -> LoomConfig:
    storage = tmp_path_factory.mktemp("runs")
    return load_config(
        TINY,
        [
            f"storage={storage}",
            "run_name=ray-tests",
            "data.max_documents=120",
            "data.vocab_size=1024",
            "data.sources=["
            "{format: stdlib, name: stdlib},"
            f"{{format: jsonl, path: '{planted_sources / 'planted.jsonl'}', name: planted}},"
            f"{{format: jsonl, path: '{planted_sources / 'compressed.jsonl.gz'}', name: gz}},"
            f"{{format: text, path: '{planted_sources / 'texts'}', name: texts}}]",
            *SMALL_MODEL,
            "train.max_steps=16",
            "train.checkpoint_every=8",
            "train.log_every=2",
            "train.eval_every=8",
            "tune.num_trials=2",  # the seeded sampler draws a sound rate, then the diverging one
            "tune.max_steps_per_trial=4",
            # Two rates around the tests' own (whichever wins, the 16-step run below learns) and a planted
            # diverging one, which ASHA (first rung: step 2, the first report) must stop early.
            f"tune.space={{train.lr: {{kind: choice, values: [3.0e-3, 4.0e-3, {DIVERGING_LR}]}}}}",
            "tune.scheduler=asha",
            "tune.grace_period_steps=2",
            # Judged by an eval task (each finished trial's model scored by the harness); ASHA still stops by loss.
            "tune.objective={task: loom_choice, metric: acc_norm}",
            *COMPRESS,
            f"serve.port={free_port()}",
            "serve.demo_max_tokens=8",
        ],
    )


@pytest.fixture(scope="package")
def prometheus(ray_cluster, tmp_path_factory):
    """Prometheus over the package's Ray cluster, from before the first stage runs (every stage fixture
    starts from data_done), so the dashboards can be checked against all that the stages exported."""
    from tests.metrics import PrometheusServer

    session_dir = ray_cluster._private.worker.global_worker.node.get_session_dir_path()
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), session_dir, free_port())
    try:
        wait_for(server.ready, 180, "Prometheus to be ready")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="package")
def stage_placement_groups(ray_cluster) -> dict[str, set[str]]:
    """The placement groups each stage fixture below created while it ran, by stage (tests/ray/test_release.py
    checks that every one of them is removed once its stage ended)."""
    return {}


@pytest.fixture(scope="package")
def data_done(ray_cluster, prometheus, tiny_config, stage_placement_groups):
    from cluster.chain import run_stage

    with placement_groups_created() as stage_placement_groups["data"]:
        return run_stage("data", tiny_config)


@pytest.fixture(scope="package")
def tune_done(data_done, tiny_config, tmp_path_factory, stage_placement_groups):
    """The sweep as a user meets two failures: ``loom tune``'s driver killed once Tune's saved state records a
    finished trial; then the stage run again, which resumes the sweep, with the first training worker of the
    resumed sweep killed (Ray Train must retry it). What each failure left is returned beside the stage's record."""
    import ray

    from cluster.chain import run_stage
    from tests.training import train_worker_pids

    scratch = tmp_path_factory.mktemp("tune-driver")
    recipe = scratch / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json", exclude_none=True)))
    # The driver joins this cluster and saves the sweep's state every second (Tune's default starts at 10 s), so it
    # is killed soon after its first trial finishes, before the next one can reach a rung and end too.
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    sweep = tiny_config.run_dir() / "tune" / "sweep"
    command = [sys.executable, "-m", "cluster", "tune", str(recipe)]
    with placement_groups_created() as stage_placement_groups["tune"]:
        kept = kill_after_first_finished_trial(command, sweep, scratch / "driver.log", 300, cwd=REPO_ROOT, env=env)
        ((kept_id, kept_dir),) = kept.items()
        reports_before = (kept_dir / "result.json").read_text()
        # Ray kills a dead driver's actors, its trial's training workers too; wait for that, so the worker killed
        # below is surely one of the resumed sweep's.
        wait_for(lambda: not train_worker_pids(), RELEASE_S, "the killed driver's training workers to end")
        killer = _WorkerKiller()
        killer.start()
        try:
            record = run_stage("tune", tiny_config)
        finally:
            killer.stop()
    return {
        "record": record,
        "kept_id": kept_id,
        "kept_dir": kept_dir,
        "reports_before": reports_before,
        "killed_worker": killer.killed,
        "workers_started_after": killer.started_after,
    }


class _WorkerKiller(threading.Thread):
    """Kills the first Ray Train worker it sees (SIGKILL) and records the workers started after it."""

    def __init__(self):
        super().__init__(daemon=True)
        self.killed: int | None = None
        self.started_after: set[int] = set()
        self._stopped = threading.Event()

    def run(self):
        from tests.training import train_worker_pids

        while not self._stopped.wait(0.2):
            pids = set(train_worker_pids())
            if self.killed is None and pids:
                victim = min(pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:  # it ended on its own meanwhile: the next one seen is killed
                    continue
                self.killed = victim
            elif self.killed is not None:
                self.started_after |= pids - {self.killed}

    def stop(self):
        self._stopped.set()
        self.join(timeout=10)


@pytest.fixture(scope="package")
def train_done(tune_done, tiny_config, stage_placement_groups):
    """The run's training, with the sweep's best learning rate."""
    from cluster.chain import run_stage

    with placement_groups_created() as stage_placement_groups["train"]:
        return run_stage("train", tiny_config)


def write_sft_pairs(path, pairs: int = 96) -> None:
    """Prompt/response pairs a tiny model can learn (the response restates the prompt's word), plus two bad lines."""
    words = ["alpha", "bravo", "delta", "kilo", "lima", "oscar", "romeo", "tango", "victor", "zulu", "echo", "hotel"]
    lines = [
        json.dumps(
            {
                "prompt": f"Spell the word {words[i % len(words)]} number {i}.",
                "response": " ".join(words[i % len(words)]),
            }
        )
        for i in range(pairs)
    ]
    lines += ['{"prompt": "a line cut short', json.dumps({"prompt": "no response here"})]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="package")
def lora_done(train_done, tiny_config, tmp_path_factory, stage_placement_groups):
    """LoRA SFT of the run's trained model on planted prompt/response pairs (its own run directory)."""
    from cluster.chain import run_stage

    pairs = tmp_path_factory.mktemp("sft") / "pairs.jsonl"
    write_sft_pairs(pairs)
    config = load_config(
        TINY,
        [
            f"storage={tiny_config.storage}",
            "run_name=ray-tests-lora",
            "tune.enabled=false",  # the fine-tune's own values
            f"train.init_from={train_done['outputs']['model']}",
            f"train.sft={{path: '{pairs}', seq_len: 64, val_fraction: 0.1}}",
            "train.lora={rank: 4, alpha: 8, target_modules: [q_proj, v_proj]}",
            "train.lr=1e-2",
            "train.max_steps=12",
            "train.checkpoint_every=6",
            "train.eval_every=6",
            "train.log_every=2",
        ],
    )
    with placement_groups_created() as stage_placement_groups["lora"]:
        return config, run_stage("train", config)


def _probes() -> list[str]:
    found = subprocess.run(["pgrep", "-f", "pipelines.compress.probe"], capture_output=True, text=True)
    return found.stdout.split()


@pytest.fixture(scope="package")
def compress_done(train_done, tiny_config, tmp_path_factory, stage_placement_groups):
    """The compression sweep as a user meets an interruption: ``python -m pipelines.compress`` killed once Tune's
    saved state records a finished candidate, then the stage run again, which resumes the sweep."""
    import ray

    from cluster.chain import run_stage

    scratch = tmp_path_factory.mktemp("compress-driver")
    recipe = scratch / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_config.model_dump(mode="json", exclude_none=True)))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}  # the driver joins this cluster
    sweep = tiny_config.run_dir() / "compress" / "sweep"
    command = [sys.executable, "-m", "pipelines.compress", str(recipe)]
    # The killed driver's reservations count as the stage's: its job's placement groups must go with it.
    with placement_groups_created() as stage_placement_groups["compress"]:
        kept = kill_after_first_finished_trial(command, sweep, scratch / "driver.log", 900, cwd=REPO_ROOT, env=env)
        ((kept_id, kept_dir),) = kept.items()
        reports_before = (kept_dir / "result.json").read_text()
        # Ray kills a dead driver's trials; the engine a trial was measuring with must go with it.
        wait_for(lambda: not _probes(), RELEASE_S, "the killed sweep's vLLM measurement to end")
        record = run_stage("compress", tiny_config)
    return {"record": record, "kept_id": kept_id, "kept_dir": kept_dir, "reports_before": reports_before}


@pytest.fixture(scope="package")
def eval_done(compress_done, tiny_config, stage_placement_groups):
    """The eval stage over the trained model and the front's variants."""
    from cluster.chain import run_stage

    with placement_groups_created() as stage_placement_groups["eval"]:
        return run_stage("eval", tiny_config)
