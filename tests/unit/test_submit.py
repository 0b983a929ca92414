"""`loom submit` builds the same module command a user would run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cluster.recipe import load_config
from cluster.submit import REPO_ROOT, SubmitError, entrypoint, runtime_env
from tests.conftest import REPO_ROOT as ROOT
from tests.conftest import TINY


def test_entrypoint_is_the_stage_module_with_relative_recipe():
    command = entrypoint("data", TINY, ["data.max_documents=10"])
    assert command == "python -m pipelines.data --config pipelines/recipes/tiny.yaml data.max_documents=10"
    assert entrypoint("run", TINY, []).startswith("python -m cluster run --config")


def test_recipe_outside_the_working_dir_is_refused(tmp_path):
    outside = tmp_path / "r.yaml"
    outside.write_text("{}")
    with pytest.raises(SubmitError, match="outside the working directory"):
        entrypoint("data", outside, [])


def test_runtime_env_uploads_repo_without_venv_or_runs():
    env = runtime_env(load_config(TINY))
    assert env["working_dir"] == str(REPO_ROOT)
    assert ".venv/" in env["excludes"] and "runs/" in env["excludes"]
    # Ray Train's controller collects reports every 0.2 s instead of 2 s in the job's processes too.
    assert env["env_vars"] == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


def test_submit_refuses_a_bad_recipe_before_contacting_anything():
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "submit", "data", str(TINY), "train.num_workers=-1",
         "--address", "http://127.0.0.1:9"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "train.num_workers" in result.stderr and "nothing was started" in result.stderr


class FlakyHead:
    """A job server whose agent comes up after two refusals, as a fresh head does."""

    def __init__(self, refusals: int, message: str = "No available agent to submit job, please try again later."):
        self.refusals, self.message, self.calls = refusals, message, 0

    def submit_job(self, entrypoint, runtime_env):
        self.calls += 1
        if self.calls <= self.refusals:
            raise RuntimeError(f"Request failed with status code 500: {self.message}")
        return "raysubmit_1"


def test_submit_retries_while_the_job_agent_starts():
    from cluster.submit import _submit_with_retry

    head = FlakyHead(refusals=2)
    assert _submit_with_retry(head, "python -m x", {}, wait_s=60, poll_s=0) == "raysubmit_1"
    assert head.calls == 3


def test_submit_gives_up_with_a_message_when_the_agent_never_comes():
    from cluster.submit import SubmitError, _submit_with_retry

    head = FlakyHead(refusals=10**9)
    with pytest.raises(SubmitError, match="job agent did not come up within 0 s.*dashboard_agent.log"):
        _submit_with_retry(head, "python -m x", {}, wait_s=0, poll_s=0)


def test_submit_does_not_retry_other_errors():
    from cluster.submit import _submit_with_retry

    head = FlakyHead(refusals=1, message="runtime_env is invalid")
    with pytest.raises(RuntimeError, match="runtime_env is invalid"):
        _submit_with_retry(head, "python -m x", {}, wait_s=60, poll_s=0)
    assert head.calls == 1


def test_a_relative_storage_inside_a_ray_job_is_refused_before_any_work(monkeypatch, capsys):
    from cluster.cli import main

    # What `ray job submit --working-dir . -- python -m pipelines.data --config ...` gives the entrypoint.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert main(["data", str(TINY)]) == 2
    err = capsys.readouterr().err
    assert "storage: 'runs' is relative" in err and "loom submit" in err and "nothing was started" in err
    assert main(["validate", str(TINY)]) == 0  # validating a recipe does no work


def test_a_python_without_looms_packages_is_named_not_a_bare_import_error(tmp_path):
    # `-S`: no site-packages, as a job whose `python` is another environment's; run from a folder holding a bare
    # `ray` directory, as Ray's /tmp/ray is when a job starts from /tmp.
    (tmp_path / "ray").mkdir()
    stage = [sys.executable, "-S", "-m", "pipelines.data", "--config", str(TINY)]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(stage, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "is not the Python environment Loom was installed in: it lacks yaml, pydantic, ray" in result.stderr
    assert "No module named" not in result.stderr


def test_a_working_dir_over_rays_upload_cap_is_refused_before_zipping_naming_the_largest_and_the_excludes(tmp_path):
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    from cluster.submit import SubmitError, check_upload_size

    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "stage.py").write_text("print('small')\n")
    (tmp_path / "checkpoints").mkdir()
    with open(tmp_path / "checkpoints" / "model.bin", "wb") as handle:
        handle.truncate(GCS_STORAGE_MAX_SIZE + 2**20)  # sparse: the size Ray would zip, no disk used
    config = load_config(TINY, [])
    with pytest.raises(SubmitError) as refused:
        check_upload_size(config, root=tmp_path)
    message = str(refused.value)
    assert "over Ray's cap" in message and "checkpoints (" in message and "cluster.runtime_env_excludes" in message

    excludes = [*config.cluster.runtime_env_excludes, "checkpoints/"]
    excluded = load_config(TINY, [f"cluster.runtime_env_excludes={json.dumps(excludes)}"])
    assert check_upload_size(excluded, root=tmp_path) == len("print('small')\n")
    # Ray's own .gitignore handling counts too, as the upload applies it.
    (tmp_path / ".gitignore").write_text("checkpoints/\n")
    assert check_upload_size(config, root=tmp_path) == len("print('small')\n") + len("checkpoints/\n")
