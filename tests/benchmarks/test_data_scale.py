"""The data stage at scale: `loom data` with a full recipe on generated corpora of growing size.

``make bench-scale`` (sizes from ``LOOM_SCALE_SIZES``, default 100,000, 300,000 and 1,000,000 documents;
``LOOM_SCALE_RUNS`` rounds, default 3). Each round runs every size once, as users run it: the CLI in its own
process with an embedded Ray, on the corpus of tests/scale_corpus.py (made once, cached under
``bench-results/scale/``). Sampled once a second while it runs: the machine's used memory, the driver's
resident memory, the summed resident memory of Ray's worker processes (which counts object-store pages each
one maps), the object store's shared memory (``/dev/shm``), and the spill directory. Read after: the step
times from the files each part wrote, the ETA the progress line showed at half the run's wall time against
the time that was really left (the line weighs its parts by the previous run's times: the benchmark's first run
has none and counts them alike), and Ray's logs for workers killed for memory.

``test_a_killed_driver_resumes_at_scale`` (``LOOM_INTERRUPT_SIZE``, default 1,000,000): the driver killed in
near-dedup and run again, ``LOOM_SCALE_RUNS`` times, against one uninterrupted run.

Goals (issue 24): documents/s per core at the largest size within 15% of the smallest; machine memory in
use never above 16 GiB; no worker killed for memory; the ETA at halfway within 25%.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines.data.stage import PROGRESS_PROFILE
from tests.benchmarks.conftest import RUNS, comparison
from tests.conftest import REPO_ROOT
from tests.scale_corpus import ScaleCorpusSpec, ensure_corpus

pytestmark = [pytest.mark.benchmark, pytest.mark.scale, pytest.mark.timeout(6 * 3600)]

SIZES = tuple(int(size) for size in os.environ.get("LOOM_SCALE_SIZES", "100000,300000,1000000").split(","))
ROUNDS = int(os.environ.get("LOOM_SCALE_RUNS", RUNS))
CACHE = REPO_ROOT / "bench-results" / "scale"
#: A progress update: "[loom] data:  42% |████   | 00:13<00:27, 02-length; next 03-charset (4/10)".
PROGRESS = re.compile(r"\[loom\] data:\s*(\d+)% \|[^|]*\| ([\d:]+)<([\d:?]+)(?:, (.*))?")
OOM = re.compile(r"killed due to (?:memory|node running low on memory)|OutOfMemoryError|memory monitor", re.I)


def recipe(corpus: Path, storage: Path, name: str) -> str:
    """The full data recipe: filters, exact and near dedup (defaults), a domain mix, BPE training, packing."""
    return f"""run_name: {name}
storage: {storage}
seed: 0
data:
  sources:
    - {{format: jsonl, path: {corpus}/jsonl/code, name: code, id_field: id}}
    - {{format: jsonl, path: {corpus}/jsonl/prose, name: prose, id_field: id}}
  steps:
    - {{type: normalize}}
    - {{type: length, min_chars: 200, max_chars: 100000}}
    - {{type: charset, scripts: [latin], min_script_fraction: 0.9}}
    - {{type: repetition}}
    - {{type: exact_dedup}}
    - {{type: minhash_dedup}}
  mix: {{code: 0.6, prose: 0.4}}
  vocab_size: 8192
  seq_len: 512
  val_fraction: 0.01
train:
  model: {{hidden_size: 64, num_heads: 4, num_kv_heads: 4}}
"""


def _seconds(clock: str) -> float | None:
    if "?" in clock:
        return None
    parts = [int(p) for p in clock.split(":")]
    return float(sum(value * 60**power for power, value in enumerate(reversed(parts))))


@dataclass
class Peaks:
    machine_used: int = 0
    driver_rss: int = 0
    workers_rss: int = 0
    shm: int = 0
    spill_files: dict[str, int] = field(default_factory=dict)

    @property
    def spilled(self) -> int:
        """Bytes spilled: every spill file at the largest size it was seen at (a lower bound: a file
        written and deleted between two samples is missed)."""
        return sum(self.spill_files.values())


class Sampler(threading.Thread):
    """Once a second: the machine's memory in use, the driver's and its Ray workers' resident memory,
    ``/dev/shm`` in use and the spill directory's files."""

    def __init__(self, driver_pid: int, spill_dir: Path):
        super().__init__(daemon=True)
        import psutil

        self.driver, self.spill_dir, self.peaks = psutil.Process(driver_pid), spill_dir, Peaks()
        self.stop = threading.Event()
        memory = psutil.virtual_memory()
        self.baseline_used = memory.total - memory.available
        self.baseline_shm = shutil.disk_usage("/dev/shm").used

    def run(self):
        import psutil

        while not self.stop.wait(1.0):
            peaks = self.peaks
            memory = psutil.virtual_memory()
            peaks.machine_used = max(peaks.machine_used, memory.total - memory.available - self.baseline_used)
            try:
                peaks.driver_rss = max(peaks.driver_rss, self.driver.memory_info().rss)
                workers = 0
                for child in self.driver.children(recursive=True):
                    try:
                        if "ray::" in " ".join(child.cmdline()):
                            workers += child.memory_info().rss
                    except psutil.Error:
                        continue
                peaks.workers_rss = max(peaks.workers_rss, workers)
            except psutil.Error:
                pass
            peaks.shm = max(peaks.shm, shutil.disk_usage("/dev/shm").used - self.baseline_shm)
            for path in self.spill_dir.rglob("*") if self.spill_dir.is_dir() else ():
                try:
                    size = path.stat().st_size if path.is_file() else 0
                except OSError:
                    continue
                peaks.spill_files[str(path)] = max(peaks.spill_files.get(str(path), 0), size)


@dataclass
class ScaleRun:
    documents: int
    wall_s: float
    peaks: Peaks
    #: (seconds since start, percent done, ETA shown in seconds or None, what the progress line says)
    updates: list[tuple[float, int, float | None, str]]
    oom_lines: list[str]
    documents_out: int
    #: Whether the progress line was weighted by an earlier run's part times (the first run counts parts alike).
    weighted: bool = False

    #: Seconds from the driver's start to the end of each part of the stage, read from the files it wrote.
    finished_at: dict[str, float] = field(default_factory=dict)

    def step_seconds(self) -> dict[str, float]:
        """Each part's own seconds: Ray's start and the read, every curation step, the tokenizer, then
        tokenize + mix + pack + write."""
        seconds, last = {}, 0.0
        for name, at in self.finished_at.items():
            seconds[name], last = round(at - last, 1), at
        return seconds

    def eta_error_at_halfway(self) -> float | None:
        """|ETA shown - time really left| / time really left, at the first update past half the wall time."""
        for t, _, eta, _ in self.updates:
            if t >= self.wall_s / 2 and eta is not None:
                left = self.wall_s - t
                return abs(eta - left) / left if left > 0 else None
        return None


def run_loom_data(corpus: Path, work: Path, name: str, documents: int) -> ScaleRun:
    shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    recipe_path = work / f"{name}.yaml"
    recipe_path.write_text(recipe(corpus, work, name))
    spill_dir = work / f"{name}-spill"
    weighted = (work / PROGRESS_PROFILE).is_file()
    shutil.rmtree(spill_dir, ignore_errors=True)
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_ADDRESS")}
    # Ray reads any of its system settings from RAY_<name>: the spill files land where the sampler looks.
    env["RAY_object_spilling_config"] = '{"type": "filesystem", "params": {"directory_path": "' + str(spill_dir) + '"}}'
    env["PYTHONUNBUFFERED"] = "1"  # each progress update as it happens
    start, start_epoch = time.monotonic(), time.time()
    process = subprocess.Popen(
        [sys.executable, "-m", "cluster", "data", str(recipe_path)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sampler = Sampler(process.pid, spill_dir)
    sampler.start()
    updates: list[tuple[float, int, float | None, str]] = []
    log: list[str] = []
    buffer, seen = b"", None

    def read(text: str, complete: bool) -> None:
        """A progress line counts when it arrives: tqdm starts each with a carriage return and ends none, so the
        last one is only split off when the next is drawn (a whole part later). Each is read once."""
        nonlocal seen
        if complete:
            log.append(text)
        match = PROGRESS.search(text)
        # A drawing is its percent, elapsed and ETA: a log line run on after it does not make it new.
        if match is None or match.group(1, 2, 3) == seen:
            return
        seen = match.group(1, 2, 3)
        updates.append((time.monotonic() - start, int(match.group(1)), _seconds(match.group(3)), match.group(4) or ""))

    while chunk := process.stdout.read1(65536):
        buffer += chunk
        *pieces, buffer = re.split(rb"[\r\n]", buffer)
        for piece in pieces:
            read(piece.decode(errors="replace"), complete=True)
        read(buffer.decode(errors="replace"), complete=False)
    returncode = process.wait()
    wall = time.monotonic() - start
    sampler.stop.set()
    sampler.join()
    if returncode != 0:
        raise AssertionError(f"loom data failed ({returncode}):\n" + "\n".join(log[-60:]))
    run_dir = work / name
    oom = [line for line in log if OOM.search(line)]
    for path in (run_dir / "logs").rglob("*"):
        if path.is_file() and path.suffix in (".out", ".err", ".log"):
            oom += [line for line in path.read_text(errors="replace").splitlines() if OOM.search(line)]
    stats = (run_dir / "data" / "stats.json").read_text()
    documents_out = int(re.search(r'"documents_out": (\d+)', stats).group(1))
    shutil.rmtree(spill_dir, ignore_errors=True)
    data = run_dir / "data"
    finished = {step.name: (step / "_COMPLETE").stat().st_mtime for step in sorted((data / "steps").iterdir())}
    finished["tokenizer"] = (data / "tokenizer" / "tokenizer.json").stat().st_mtime
    finished["tokenize, mix, pack"] = (data / "stats.json").stat().st_mtime
    run = ScaleRun(documents, wall, sampler.peaks, updates, oom, documents_out, weighted)
    run.finished_at = {name: at - start_epoch for name, at in finished.items()}
    return run


def test_data_stage_at_scale(record_benchmark):
    corpora = {size: ensure_corpus(ScaleCorpusSpec(documents=size), CACHE) for size in SIZES}
    cores = os.cpu_count() or 1
    runs: dict[int, list[ScaleRun]] = {size: [] for size in SIZES}
    # The first run counts the progress line's parts alike, as a user's first run on new storage; each later
    # one is weighted by the run before it (often another size).
    (CACHE / "runs" / PROGRESS_PROFILE).unlink(missing_ok=True)
    for round_ in range(ROUNDS):
        for size in SIZES:
            run = run_loom_data(corpora[size], CACHE / "runs", f"scale-{size}", size)
            runs[size].append(run)
            with (CACHE / "runs.jsonl").open("a") as log:  # each run as it ends: a failed round loses none
                log.write(
                    json.dumps(
                        {
                            "documents": size,
                            "round": round_ + 1,
                            "wall_s": run.wall_s,
                            "steps": run.step_seconds(),
                            "eta_error": run.eta_error_at_halfway(),
                            "weighted": run.weighted,
                            "peaks": vars(run.peaks) | {"spill_files": None, "spilled": run.peaks.spilled},
                            "oom": len(run.oom_lines),
                        }
                    )
                    + "\n"
                )
            print(
                f"round {round_ + 1} {size:,} documents: {run.wall_s:.0f} s, {size / run.wall_s / cores:.0f} docs/s/core, "
                f"steps {run.step_seconds()}, peak machine memory {run.peaks.machine_used / 2**30:.2f} GiB",
                flush=True,
            )
    gib = 2**30
    quantities: dict[str, list[float]] = {}
    for size in SIZES:
        done = runs[size]
        quantities[f"{size} docs/s/core"] = [size / run.wall_s / cores for run in done]
        quantities[f"{size} seconds"] = [run.wall_s for run in done]
        quantities[f"{size} peak machine memory GiB"] = [run.peaks.machine_used / gib for run in done]
        quantities[f"{size} peak driver RSS GiB"] = [run.peaks.driver_rss / gib for run in done]
        quantities[f"{size} peak workers RSS GiB"] = [run.peaks.workers_rss / gib for run in done]
        quantities[f"{size} peak object store shm GiB"] = [run.peaks.shm / gib for run in done]
        quantities[f"{size} spilled GiB"] = [run.peaks.spilled / gib for run in done]
        quantities[f"{size} workers killed for memory"] = [float(len(run.oom_lines)) for run in done]
        errors = [run.eta_error_at_halfway() for run in done]
        assert None not in errors, f"{size}: no ETA was shown past half the run: {[r.updates for r in done]}"
        quantities[f"{size} ETA error at halfway"] = errors
    smallest, largest = min(SIZES), max(SIZES)
    record_benchmark(
        "data_scale",
        stage="data",
        measure="`loom data`, full recipe, on generated corpora of growing size",
        inputs={
            "sizes": list(SIZES),
            "corpus": "tests/scale_corpus.py defaults (code and prose from installed packages, planted copies and junk)",
            "recipe": recipe(Path("CORPUS"), Path("RUNS"), "scale"),
            "cores": cores,
        },
        quantities=quantities,
        comparisons=[
            comparison(
                f"documents/s per core, {largest:,} vs {smallest:,} documents",
                f"`loom data` documents/s per core, {largest:,} vs {smallest:,} generated documents (goal: within 15%)",
                quantities,
                f"{largest} docs/s/core",
                f"{smallest} docs/s/core",
            ),
            comparison(
                f"peak machine memory at {largest:,} documents (GiB)",
                f"peak machine memory in use by `loom data` at {largest:,} documents, GiB (goal: at most 16)",
                quantities,
                f"{largest} peak machine memory GiB",
                better="lower",
            ),
            comparison(
                f"ETA error at halfway, {largest:,} documents",
                f"progress ETA error at half the run, |shown - real| / real, {largest:,} documents (goal: at most 0.25)",
                quantities,
                f"{largest} ETA error at halfway",
                better="lower",
            ),
        ],
        command=f'LOOM_SCALE_SIZES={",".join(map(str, SIZES))} make bench-scale PYTEST_ARGS="-k test_data_stage_at_scale"',
        step_seconds={size: [run.step_seconds() for run in runs[size]] for size in SIZES},
        documents_out={size: [run.documents_out for run in runs[size]] for size in SIZES},
        oom_lines={size: [line for run in runs[size] for line in run.oom_lines][:20] for size in SIZES},
        progress_weighted_by_an_earlier_run={size: [run.weighted for run in runs[size]] for size in SIZES},
    )


INTERRUPT_SIZE = int(os.environ.get("LOOM_INTERRUPT_SIZE", "1000000"))
#: Near-dedup's place in ``recipe``'s steps (1-based; 00-read comes first) and the steps complete before it.
NEAR_DEDUP = 6
BEFORE_NEAR_DEDUP = ["00-read", "01-normalize", "02-length", "03-charset", "04-repetition", "05-exact_dedup"]


def test_a_killed_driver_resumes_at_scale(record_benchmark):
    """`kill -9` of the `loom data` driver while it computes near-dedup on ``LOOM_INTERRUPT_SIZE`` documents, then
    `loom data` again: the rerun reads back the six finished steps and its kept ids, rejects, tokenizer and packed
    shards equal an uninterrupted run's. Measured: when the kill landed, how long Ray took to end the killed job's
    processes, and the rerun's time against the uninterrupted run's."""
    from tests.interrupt import inside_step, output_facts, run_killed_then_resumed, run_uninterrupted

    corpus = ensure_corpus(ScaleCorpusSpec(documents=INTERRUPT_SIZE), CACHE)
    work = CACHE / "interrupted"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(recipe(corpus, work, "whole"))
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_ADDRESS")}  # embedded Ray
    command = [sys.executable, "-m", "cluster", "data", str(recipe_path)]
    timeout_s = 3 * 3600

    whole = run_uninterrupted(command, env, work / "whole", timeout_s, cwd=REPO_ROOT)
    assert whole["returncode"] == 0, whole["output"][-4000:]
    expected = output_facts(work / "whole")
    quantities: dict[str, list[float]] = {
        "kill after s": [],
        "processes ended after s": [],
        "rerun s": [],
        "rerun / uninterrupted": [],
    }
    reports = []
    for round_ in range(ROUNDS):
        name = f"killed-{round_}"
        report = run_killed_then_resumed(
            [*command, f"run_name={name}"],
            env,
            work / name,
            inside_step("minhash_dedup", NEAR_DEDUP),
            timeout_s,
            cwd=REPO_ROOT,
        )
        summary = {key: value for key, value in report.items() if key not in ("rerun_output",)}
        assert report["killed"] and report["complete_at_kill"] == BEFORE_NEAR_DEDUP, summary
        assert not report["left_running"], summary
        assert report["rerun_returncode"] == 0, report["rerun_output"][-4000:]
        assert report["resumed"] == BEFORE_NEAR_DEDUP and not report["recomputed"], summary
        assert output_facts(work / name) == expected, summary
        print(
            f"round {round_ + 1}: killed after {report['kill_after_s']:.0f} s, processes ended after "
            f"{report['released_after_s']:.1f} s, rerun {report['rerun_wall_s']:.0f} s (uninterrupted {whole['wall_s']:.0f} s)",
            flush=True,
        )
        quantities["kill after s"].append(report["kill_after_s"])
        quantities["processes ended after s"].append(report["released_after_s"])
        quantities["rerun s"].append(report["rerun_wall_s"])
        quantities["rerun / uninterrupted"].append(report["rerun_wall_s"] / whole["wall_s"])
        reports.append({key: summary[key] for key in ("kill_after_s", "released_after_s", "resumed", "states_at_kill")})
        shutil.rmtree(work / name, ignore_errors=True)
    record_benchmark(
        "data_interrupted_scale",
        stage="data",
        measure=f"`loom data` on {INTERRUPT_SIZE:,} documents, its driver killed (SIGKILL) in near-dedup, then run again",
        inputs={
            "documents": INTERRUPT_SIZE,
            "recipe": recipe(Path("CORPUS"), Path("RUNS"), "whole"),
            "killed_in": "minhash_dedup",
        },
        quantities=quantities,
        comparisons=[
            comparison(
                "rerun after a kill in near-dedup vs an uninterrupted run (time)",
                "the rerun's wall time over the uninterrupted run's: it reads back the six finished steps (outputs equal "
                "in every round: kept ids, rejects, tokenizer, packed shards in order)",
                quantities,
                "rerun / uninterrupted",
                better="lower",
            ),
        ],
        command=f'LOOM_INTERRUPT_SIZE={INTERRUPT_SIZE} make bench-scale PYTEST_ARGS="-k test_a_killed_driver_resumes_at_scale"',
        uninterrupted_s=whole["wall_s"],
        outputs=expected,
        rounds=reports,
    )
