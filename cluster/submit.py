"""`loom submit`: validate locally, then run the same module command as a Ray job."""

from __future__ import annotations

import logging
import os
import shlex
import time
from pathlib import Path

from cluster.auth import default_token_path, enable_client_token
from cluster.recipe import LoomConfig
from cluster.stages import STAGES

REPO_ROOT = Path(__file__).resolve().parent.parent

#: What a job may run: a stage (its registry module, `python -m MODULE --config RECIPE OVERRIDES`) or the chain.
RUN_ALL = "run"  # `python -m cluster run ...`: the whole chain
SUBMITTABLE = (*STAGES, RUN_ALL)
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(Exception):
    pass


def entrypoint(stage: str, recipe: Path, overrides: list[str]) -> str:
    recipe = recipe.resolve()
    try:
        relative = recipe.relative_to(REPO_ROOT)
    except ValueError:
        raise SubmitError(
            f"recipe {recipe} is outside the working directory {REPO_ROOT} that is uploaded; "
            "copy it under the repository (e.g. pipelines/recipes/)"
        ) from None
    if stage not in SUBMITTABLE:
        raise SubmitError(f"no stage {stage!r}; submit one of: {', '.join(SUBMITTABLE)}")
    command = ["python", "-m", "cluster", RUN_ALL] if stage == RUN_ALL else ["python", "-m", STAGES[stage].module]
    return shlex.join([*command, "--config", str(relative), *overrides])


def runtime_env(config: LoomConfig) -> dict:
    env: dict = {
        "working_dir": str(REPO_ROOT),
        "excludes": list(config.cluster.runtime_env_excludes),
        "env_vars": config.cluster.ray_env_vars(),
    }
    if config.cluster.pip:
        env["pip"] = list(config.cluster.pip)
    return env


def upload_size(config: LoomConfig, root: Path = REPO_ROOT) -> tuple[int, list[tuple[str, int]]]:
    """Bytes of the working_dir Ray would upload, and the five largest top-level entries in it.

    Walked with Ray's own traversal (its private ``packaging._dir_travel``: the runtime_env excludes, then
    .gitignore and .rayignore as the upload applies them), so the count is what the upload would zip.
    """
    from ray._private.runtime_env import packaging

    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"
    by_entry: dict[str, int] = {}

    def count(path: Path) -> None:
        if path.is_file():
            top = path.relative_to(root).parts[0]
            by_entry[top] = by_entry.get(top, 0) + path.stat().st_size

    quiet = logging.getLogger(f"{__name__}.upload_size")  # Ray logs every ignore file it reads at INFO
    quiet.setLevel(logging.WARNING)
    excludes = [packaging._get_excludes(root, list(config.cluster.runtime_env_excludes))]
    packaging._dir_travel(root, excludes, count, include_gitignore=include_gitignore, logger=quiet)
    largest = sorted(by_entry.items(), key=lambda item: -item[1])[:5]
    return sum(by_entry.values()), largest


def check_upload_size(config: LoomConfig, root: Path = REPO_ROOT) -> int:
    """Refuse, before zipping anything, a working_dir over the cap Ray's upload enforces (its gRPC message
    size); the message names the largest entries and where the excludes are set."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    total, largest = upload_size(config, root)
    if total >= GCS_STORAGE_MAX_SIZE:
        entries = ", ".join(f"{name} ({size / 2**20:,.0f} MiB)" for name, size in largest)
        raise SubmitError(
            f"the working_dir {root} holds {total / 2**20:,.0f} MiB to upload, over Ray's cap of "
            f"{GCS_STORAGE_MAX_SIZE / 2**20:,.0f} MiB. Largest: {entries}. Leave them out with "
            f"cluster.runtime_env_excludes (now {list(config.cluster.runtime_env_excludes)}) or a .rayignore file"
        )
    return total


def _submit_with_retry(client, command: str, env: dict, wait_s: float = 300.0, poll_s: float = 2.0) -> str:
    """Submit, retrying while the head says its job agent is not up yet.

    A freshly started head serves its dashboard a few seconds before the job agent
    registers, and answers "No available agent to submit job, please try again later";
    on a loaded 2-core machine that took over a minute. An agent that never comes (it
    could not bind its port, say) is reported after ``wait_s`` instead of waiting forever.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env=env)
        except RuntimeError as err:
            if "try again later" not in str(err):
                raise
            if time.monotonic() > deadline:
                raise SubmitError(
                    f"the head's job agent did not come up within {wait_s:.0f} s ({err}); see "
                    "dashboard_agent.log in the head's Ray log folder (a port already in use is the usual cause)"
                ) from None
            time.sleep(poll_s)


def submit(stage: str, recipe: Path, overrides: list[str], config: LoomConfig, address: str, wait: bool = True) -> int:
    """Submit and (with ``wait``) stream the job's logs; return 0 when it succeeded."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    size = check_upload_size(config)
    source = enable_client_token()
    print(f"[loom] Ray token: {source or 'none found (a token-protected head will refuse the job)'}", flush=True)
    try:
        client = JobSubmissionClient(address)
    except AuthenticationError as err:
        raise SubmitError(
            f"the Ray cluster at {address} refused this client's token ({source or 'none sent'}): put the "
            f"cluster's token in {default_token_path()} (the file cluster.yaml mounts on every node) or in "
            "$RAY_AUTH_TOKEN"
        ) from err
    if not Path(config.storage).is_absolute():
        # A job runs in an unpacked copy of the working_dir: a relative storage path would
        # land in Ray's temporary files. Anchor it where the submitter stands.
        absolute = Path(config.storage).resolve()
        print(f"[loom] storage '{config.storage}' is relative; the job writes to {absolute}", flush=True)
        overrides = [*overrides, f"storage={absolute}"]
    command = entrypoint(stage, recipe, overrides)
    job_id = _submit_with_retry(client, command, runtime_env(config))
    print(f"[loom] submitted {job_id} to {address} ({size / 2**20:,.1f} MiB uploaded): {command}", flush=True)
    if not wait:
        return 0
    printed = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        print(logs[printed:], end="", flush=True)
        printed = len(logs)
        if status in TERMINAL:
            print(f"[loom] job {job_id}: {status}", flush=True)
            return 0 if status == "SUCCEEDED" else 1
        time.sleep(2)
