"""A `loom data` driver killed with SIGKILL in the middle of a step, then run again: what the kill found, what the
rerun resumed, and the facts that say whether its outputs equal an uninterrupted run's.

The data stage materialises each curation step under ``<run>/data/steps/NN-name/`` (written as ``NN-name.partial``,
renamed, then a ``_COMPLETE`` marker holding the step's chained key); a rerun reads every step whose marker matches
and computes the rest (pipelines/data/stage.py: ``curate``, ``_cached``).

    report = run_killed_then_resumed(command, env, run_dir, inside_step("minhash_dedup"), timeout_s=600)
    assert output_facts(run_dir) == output_facts(uninterrupted_run_dir)

``command`` is the whole `loom data RECIPE ...` command line (``[python, "-m", "cluster", "data", recipe]``);
``env`` its environment: with ``RAY_ADDRESS`` the driver joins that cluster (the killed job's workers are then
found through the cluster's State API, see ``ray_api``), without it the driver starts an embedded Ray, whose
processes are the driver's descendants.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

MARKER = "_COMPLETE"  # pipelines.runs.MARKER, without importing the project into a benchmark's driver
PARTIAL = ".partial"
STEP_NAME = re.compile(r"^(\d+)-(.+)$")
#: A Ray node's agents: an embedded Ray's outlive a killed driver by about a minute (they notice the raylet gone).
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


# -- the steps' state on disk ------------------------------------------------------------------------------------


def steps_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "data" / "steps"


def step_states(run_dir: Path) -> dict[str, str]:
    """Every step directory by name (``NN-name``), in order: ``complete`` (marker written), ``written`` (renamed from
    ``.partial``, no marker yet) or ``partial`` (only ``NN-name.partial`` exists: being written)."""
    states: dict[str, str] = {}
    root = steps_dir(run_dir)
    if not root.is_dir():
        return states
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        if path.name.endswith(PARTIAL):
            states.setdefault(path.name[: -len(PARTIAL)], "partial")
        else:
            states[path.name] = "complete" if (path / MARKER).is_file() else "written"
    return dict(sorted(states.items()))


def completed_steps(run_dir: Path) -> list[str]:
    return [name for name, state in step_states(run_dir).items() if state == "complete"]


def _step_index(run_dir: Path, step: str) -> int | None:
    """The index NN of the step named ``step`` (its type, e.g. ``minhash_dedup``), once any of its directories exist
    or its predecessor's does; None before."""
    for name in step_states(run_dir):
        match = STEP_NAME.match(name)
        if match and match.group(2) == step:
            return int(match.group(1))
    return None


def inside_step(step: str, index: int | None = None) -> Callable[[Path], bool]:
    """``kill_when``: true once every step before ``step`` (its type, e.g. ``minhash_dedup``, at position ``index``
    of the recipe's steps, 1-based; ``read`` is 0) is complete and ``step`` is not: the driver is computing it.

    Without ``index`` the step is found by its directory, which appears only once it writes its output; give
    ``index`` (the step's 1-based position in ``data.steps``) to catch it from its first moment."""

    def check(run_dir: Path) -> bool:
        states = step_states(run_dir)
        position = index if index is not None else _step_index(run_dir, step)
        if position is None:
            return False
        before = [name for name in states if STEP_NAME.match(name) and int(STEP_NAME.match(name).group(1)) < position]
        own = f"{position:02d}-{step}"
        return (
            len(before) == position
            and all(states[name] == "complete" for name in before)
            and states.get(own) != "complete"
        )

    return check


def writing_step(step: str) -> Callable[[Path], bool]:
    """``kill_when``: true once ``NN-step.partial`` holds a parquet file: the step's output is half written.

    The window is the write of the step's output only (about 1.5 s of the 12 s near-dedup takes on 3,000 documents
    on 2 cores); ``inside_step`` is the robust choice where the kill must land."""

    def check(run_dir: Path) -> bool:
        root = steps_dir(run_dir)
        return root.is_dir() and any(
            any(path.glob("*.parquet"))
            for path in root.glob(f"*-{step}{PARTIAL}")
            if STEP_NAME.match(path.name[: -len(PARTIAL)])
        )

    return check


def step_files(run_dir: Path) -> dict[str, dict[str, tuple[int, int, int]]]:
    """Each step directory's files (partial ones too) -> (inode, size, mtime_ns): a step whose entry is unchanged
    by a rerun was read back, not computed again."""
    snapshot: dict[str, dict[str, tuple[int, int, int]]] = {}
    root = steps_dir(run_dir)
    if not root.is_dir():
        return snapshot
    for path in sorted(root.iterdir()):
        if not path.is_dir():
            continue
        files = snapshot[path.name] = {}
        for child in sorted(path.iterdir()):
            try:  # a killed job's last writes may still land in a .partial directory
                st = child.stat()
            except FileNotFoundError:
                continue
            files[child.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return snapshot


# -- processes ---------------------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (an embedded Ray's GCS, raylet and workers are the driver's)."""
    children, found, todo = _children(), set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid from the process seen before)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def alive(processes: dict[int, int | None]) -> dict[int, str]:
    """Those of ``processes`` (pid -> start time) still running (zombies are dead), with their command lines."""
    return {
        pid: command_line(pid)
        for pid, started in processes.items()
        if _start_time(pid) == started and _state(pid) not in (None, "Z", "X")
    }


def ray_api_address() -> str | None:
    """The dashboard (State API) of the cluster this process is connected to; None when it is not connected."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    url = ray._private.worker.get_dashboard_url()  # what ray.init prints; no public API returns it
    return f"http://{url}" if url else None


def driver_job_id(pid: int) -> str | None:
    """The Ray job whose driver is ``pid`` (the GCS's job table), when this process is connected to its cluster."""
    import ray

    if not ray.is_initialized():
        return None
    jobs = [job for job in ray._private.state.jobs() if job["DriverPid"] == pid]
    return max(jobs, key=lambda job: job["StartTime"])["JobID"] if jobs else None


def job_dead(job_id: str) -> bool:
    import ray

    return any(job["JobID"] == job_id and job["IsDead"] for job in ray._private.state.jobs())


def job_worker_pids(api: str, job_id: str) -> set[int]:
    """Pids of the worker processes that ran a task or hold an actor of ``job_id``, detached actors aside (Ray's
    State API at ``api``: task events reach it within about a second of a task starting). The API answers at most
    10,000 tasks: the running ones are asked for on their own, so a big job's busy workers are never among those cut
    off."""
    from ray.util.state import list_actors, list_tasks

    job = ("job_id", "=", job_id)
    tasks = [
        task
        for filters in ([job], [job, ("state", "=", "RUNNING")])
        for task in list_tasks(address=api, filters=filters, limit=10_000, raise_on_missing_output=False)
    ]
    # Every actor once (the job's own and the detached ones). A detached actor outlives the job that made it, by
    # design: Ray Data's autoscaling coordinator is one a cluster, made by whichever job asks first and used by every
    # job after. It is no process of the job to end with it.
    actors = list_actors(address=api, limit=10_000, raise_on_missing_output=False, detail=True)
    detached = {actor.pid for actor in actors if actor.is_detached and actor.pid}
    own = {actor.pid for actor in actors if actor.job_id == job_id and actor.pid}
    return ({t.worker_pid for t in tasks if t.worker_pid} | own) - detached


# -- the experiment ----------------------------------------------------------------------------------------------


def _run(command, env, cwd, log_path: Path, timeout_s: float) -> tuple[int, float, str]:
    started = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise AssertionError(f"{' '.join(map(str, command))} ran over {timeout_s:.0f} s: {log_path}") from None
    return returncode, time.monotonic() - started, log_path.read_text()


def run_uninterrupted(command, env, run_dir: Path, timeout_s: float, log_path: Path | None = None, cwd=None) -> dict:
    """The command run to the end: {"returncode", "wall_s", "output"}."""
    log_path = Path(log_path or Path(run_dir).with_name(Path(run_dir).name + ".log"))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    returncode, wall_s, output = _run(command, env, cwd, log_path, timeout_s)
    return {"returncode": returncode, "wall_s": wall_s, "output": output, "log": str(log_path)}


def run_killed_then_resumed(
    command: list[str],
    env: dict[str, str],
    run_dir: Path,
    kill_when: Callable[[Path], bool],
    timeout_s: float,
    *,
    cwd: str | Path | None = None,
    logs: Path | None = None,
    poll_s: float = 0.02,
    release_s: float = 120,
    ray_api: str | None = None,
) -> dict:
    """Start ``command`` (a `loom data` driver, in its own session and process group), poll until
    ``kill_when(run_dir)`` holds, SIGKILL the driver process alone (what `kill -9 <driver>` does), wait for Ray to
    end the killed job's processes, then run the same command again to the end.

    The killed job's processes are the driver's descendants (an embedded Ray) and, when this process is connected to
    the cluster the driver joined (``RAY_ADDRESS`` in ``env``), every worker that ran a task or held an actor of its
    job (State API at ``ray_api``, default: this process's cluster's dashboard). The rerun starts once they are all
    gone, or ``release_s`` after the kill; those still running then are listed (``left_running``; an embedded Ray's
    node agents, which take about a minute, under ``agents_left_running``) and killed, so the rerun meets a clean
    machine; a caller asserts ``left_running`` is empty.

    Returns a dict:
      killed: whether the kill landed (False: the driver exited first; see ``first_returncode``)
      kill_after_s: seconds from the driver's start to the kill; first_returncode: -9 when killed
      states_at_kill: ``step_states`` right after the kill; complete_at_kill: the steps complete then
      job_id, job_pids: the killed job (None without a connection to its cluster) and the processes it held
      released_after_s: seconds from the kill until none of them (node agents aside) ran, None if some never stopped
      all_released_after_s: the same, node agents included
      left_running, agents_left_running: pid -> command line of those still running after ``release_s``
      rerun_returncode, rerun_wall_s, rerun_output
      resumed: steps complete at the kill whose files the rerun left untouched; recomputed: those it rewrote
      resumed_marks: steps the rerun's progress line marked "(resumed)" (the line redraws at most once a second,
        so quick steps may be missing: ``resumed`` is the fact)
      states_after: ``step_states`` after the rerun; leftover_partials: ``.partial`` directories left
      first_log, rerun_log: the two drivers' output files
    """
    run_dir = Path(run_dir)
    logs = Path(logs or run_dir.parent)
    logs.mkdir(parents=True, exist_ok=True)
    first_log, rerun_log = logs / f"{run_dir.name}.killed.log", logs / f"{run_dir.name}.rerun.log"
    deadline = time.monotonic() + timeout_s
    report: dict = {"first_log": str(first_log), "rerun_log": str(rerun_log)}

    started = time.monotonic()
    with first_log.open("w") as log:
        driver = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while driver.poll() is None and not kill_when(run_dir):
                if time.monotonic() > deadline:
                    raise AssertionError(f"kill_when never held within {timeout_s:.0f} s: {first_log}")
                time.sleep(poll_s)
            report["killed"] = driver.poll() is None
            # Everything that goes with the driver, looked up before the kill, while the tree is intact.
            below = {pid: _start_time(pid) for pid in descendants(driver.pid)}
            if report["killed"]:
                driver.send_signal(signal.SIGKILL)
                report["kill_after_s"] = time.monotonic() - started
            report["first_returncode"] = driver.wait(timeout=60)
        except BaseException:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
            raise
        killed_at = time.monotonic()
    report["states_at_kill"] = step_states(run_dir)
    report["complete_at_kill"] = [name for name, state in report["states_at_kill"].items() if state == "complete"]
    files_at_kill = step_files(run_dir)

    # Ray's fate-sharing: the GCS marks the driver's job dead once its connection drops, and the raylet kills the
    # job's workers; an embedded Ray's processes die with their parent, its node agents about a minute later.
    report["job_id"] = job_id = driver_job_id(driver.pid)
    api = ray_api or ray_api_address()
    processes = dict(below)
    released_at = None  # since when none of the job's processes (node agents aside) runs
    while True:
        now = time.monotonic()
        if job_id is not None and api is not None:
            for pid in job_worker_pids(api, job_id):  # task events arrive up to a second late: asked each time
                processes.setdefault(pid, _start_time(pid))
        left = alive(processes)
        if any(not cmd.startswith(RAY_AGENTS) for cmd in left.values()) or (job_id and not job_dead(job_id)):
            released_at = None
        elif released_at is None:
            released_at = now
        # Settled: 2 s (twice the task-event flush interval) after the last worker went, so a worker that started a
        # task just before the kill has been heard of.
        if (released_at is not None and now - released_at >= 2.0 and not left) or now > killed_at + release_s:
            break
        time.sleep(0.25)
    report["job_pids"] = sorted(processes)
    report["left_running"] = {pid: cmd for pid, cmd in left.items() if not cmd.startswith(RAY_AGENTS)}
    report["agents_left_running"] = {pid: cmd for pid, cmd in left.items() if cmd.startswith(RAY_AGENTS)}
    report["released_after_s"] = None if report["left_running"] else (released_at or now) - killed_at
    report["all_released_after_s"] = None if left else now - killed_at
    for pid in left:  # as Ray should have: the rerun must not share the steps with them
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    returncode, wall_s, output = _run(command, env, cwd, rerun_log, max(1.0, deadline - time.monotonic()))
    report.update(rerun_returncode=returncode, rerun_wall_s=wall_s, rerun_output=output)
    files_after = step_files(run_dir)
    report["resumed"] = [name for name in report["complete_at_kill"] if files_after.get(name) == files_at_kill[name]]
    report["recomputed"] = [name for name in report["complete_at_kill"] if name not in report["resumed"]]
    report["resumed_marks"] = sorted(set(re.findall(r"([A-Za-z0-9_]+) \(resumed\)", output)))
    report["states_after"] = step_states(run_dir)
    report["leftover_partials"] = sorted(p.name for p in steps_dir(run_dir).glob(f"*{PARTIAL}"))
    return report


# -- what two runs must share ------------------------------------------------------------------------------------


def _parquet_files(directory: Path) -> list[Path]:
    """A Ray Data write's files in the order of its blocks: ``<prefix>_<uuid>_<task>-<part>.parquet``, one prefix
    and uuid per write (they differ between runs), so ordered by (task, part) numerically."""

    def order(path: Path):
        found = re.search(r"_(\d+)-(\d+)\.parquet$", path.name)
        return (0, int(found.group(1)), int(found.group(2)), path.name) if found else (1, 0, 0, path.name)

    return sorted(Path(directory).glob("*.parquet"), key=order)


def last_step_dir(run_dir: Path) -> Path:
    """The last complete curation step's directory: the documents the stage kept, and why it dropped the rest."""
    done = completed_steps(run_dir)
    if not done:
        raise FileNotFoundError(f"no complete step under {steps_dir(run_dir)}")
    return steps_dir(run_dir) / max(done, key=lambda name: int(STEP_NAME.match(name).group(1)))


def kept_doc_ids(run_dir: Path) -> list[str]:
    """Doc ids the last curation step kept (rows whose ``reject_reason`` is null), sorted."""
    import pyarrow.dataset as pads

    files = [str(p) for p in _parquet_files(last_step_dir(run_dir))]
    table = pads.dataset(files, format="parquet").to_table(
        columns=["doc_id"], filter=pads.field("reject_reason").is_null()
    )
    return sorted(table.column("doc_id").to_pylist())


class _ColumnsDigest:
    """A hash of a table's columns in row order, independent of how the rows are split into files and batches: each
    column's validity, list lengths and values feed their own digest, as one stream over all the batches."""

    def __init__(self) -> None:
        self.parts: dict[str, hashlib._Hash] = {}

    def _update(self, key: str, data: bytes) -> None:
        self.parts.setdefault(key, hashlib.sha256()).update(data)

    def add(self, key: str, array) -> None:
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        kind = array.type
        self._update(f"{key}/valid", array.is_valid().to_numpy(zero_copy_only=False).astype(np.uint8).tobytes())
        if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype("<i8")
            self._update(f"{key}/lengths", lengths.tobytes())
            self.add(f"{key}/item", array.flatten())
        elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
            dtype = "<f8" if pa.types.is_floating(kind) else "<i8"
            values = array.fill_null(False if pa.types.is_boolean(kind) else 0).to_numpy(zero_copy_only=False)
            self._update(f"{key}/values", values.astype(dtype).tobytes())
        else:  # strings and the rest, one value at a time (length-prefixed)
            for value in array.to_pylist():
                encoded = json.dumps(value, sort_keys=True, default=repr).encode()
                self._update(f"{key}/values", len(encoded).to_bytes(8, "little") + encoded)

    def hexdigest(self) -> str:
        total = hashlib.sha256()
        for key in sorted(self.parts):
            total.update(key.encode() + b"\0" + self.parts[key].digest())
        return total.hexdigest()


def rows_hash(directory: Path, ordered: bool = True) -> dict:
    """Content hash of a parquet directory's decoded rows: in the write's block order (``ordered``; columnar, so
    millions of packed sequences hash in seconds), or as a sorted multiset of rows (one JSON encoding each: for
    thousands, not millions). File names, the split into files and parquet metadata, which differ between runs,
    play no part.

    Returns {"rows", "columns", "sha256"}; an absent or empty directory is {"rows": 0, "columns": [], "sha256": None}."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    files = _parquet_files(directory) if directory.is_dir() else []
    rows, columns, ordered_digest, row_digests = 0, None, _ColumnsDigest(), []
    for path in files:
        parquet = pq.ParquetFile(path)
        names = [f"{field.name}:{field.type}" for field in parquet.schema_arrow]
        if columns is None:
            columns = names
        elif names != columns:
            raise ValueError(f"{path}: columns {names}, where the files before it have {columns}")
        for batch in parquet.iter_batches(batch_size=65_536):
            rows += batch.num_rows
            if ordered:
                for name, column in zip(batch.schema.names, batch.columns, strict=True):
                    ordered_digest.add(name, column)
            else:
                row_digests += [
                    hashlib.sha256(
                        json.dumps(row, sort_keys=True, separators=(",", ":"), default=repr).encode()
                    ).digest()
                    for row in batch.to_pylist()
                ]
    if not rows:
        return {"rows": 0, "columns": columns or [], "sha256": None}
    if ordered:
        digest = ordered_digest.hexdigest()
    else:
        multiset = hashlib.sha256()
        for row_digest in sorted(row_digests):
            multiset.update(row_digest)
        digest = multiset.hexdigest()
    return {"rows": rows, "columns": columns, "sha256": digest}


def _files_hash(directory: Path) -> str | None:
    """Names and bytes of a directory's files (the tokenizer: trained on the kept text, byte for byte the same)."""
    files = sorted(p for p in Path(directory).rglob("*") if p.is_file()) if Path(directory).is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def output_facts(run_dir: Path, ordered: bool = True) -> dict:
    """What an interrupted run must share with an uninterrupted one: the kept doc ids (count and hash), the rejects
    (as a multiset: their write order follows the dedup's shuffles), the tokenizer's files and the train/val shards'
    rows (in order, unless ``ordered`` is False). Small: compare two runs' dicts with ``==``."""
    run_dir = Path(run_dir)
    kept = kept_doc_ids(run_dir)
    data = run_dir / "data"
    stats = json.loads((data / "stats.json").read_text()) if (data / "stats.json").is_file() else {}
    return {
        "kept": len(kept),
        "kept_ids_sha256": hashlib.sha256("\n".join(kept).encode()).hexdigest(),
        "rejects": rows_hash(data / "rejects", ordered=False),
        "train": rows_hash(data / "train", ordered=ordered),
        "val": rows_hash(data / "val", ordered=ordered),
        "tokenizer": _files_hash(data / "tokenizer"),
        "documents_out": stats.get("documents_out"),
        "sequences": stats.get("sequences"),
    }
