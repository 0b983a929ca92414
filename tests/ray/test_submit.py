"""`loom submit` against a real head started with `ray start --head`."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, TINY
from tests.ray.heads import second_head

pytestmark = pytest.mark.ray


@pytest.fixture
def auth_env():
    """Ray 2.60 clusters use token authentication: the head and `loom submit` share a token.

    The job's `python` is the head's: as on a cluster node, Loom's environment comes first on PATH.
    """
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    token = secrets.token_hex(32)
    return {**os.environ, "PATH": path, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


@pytest.fixture
def ray_head(auth_env):
    flags = ["--num-cpus=4", "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats"]
    with second_head(flags, auth_env, auth_env["RAY_AUTH_TOKEN"], Path(f"/tmp/loom-head-{os.getpid()}")) as head:
        yield head.dashboard


def test_submit_data_stage_to_a_real_head(ray_head, auth_env, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "submit", "data", str(TINY),
         f"storage={tmp_path}", "run_name=submitted", "data.max_documents=40", "data.vocab_size=512",
         "--address", ray_head],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=auth_env,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "SUCCEEDED" in output and "python -m pipelines.data --config pipelines/recipes/tiny.yaml" in output
    run_dir = tmp_path / "submitted"
    assert (run_dir / "data" / "_COMPLETE").is_file()
    stats = json.loads((run_dir / "data" / "stats.json").read_text())
    assert stats["documents_in"] == 40 and stats["sequences"]["train"] > 0
