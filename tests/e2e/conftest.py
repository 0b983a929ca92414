"""The e2e tests' one chain: `loom run` trains it (test_loom_run.py); `ray up`'s job (test_ray_up.py) starts from a
copy of that run, so the launched cluster's `loom run` skips the stages already complete and serves."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import SMALL_MODEL

#: The recipe overrides of the e2e chain: the tiny recipe on the tests' small model, a one-trial sweep.
CHAIN = [
    "data.max_documents=150", *SMALL_MODEL, "train.max_steps=12", "train.checkpoint_every=6", "train.eval_every=6",
    "tune.num_trials=1", "tune.max_steps_per_trial=2",  # the sweep itself: tests/ray/test_stages.py
    "compress.enabled=false",  # the compression sweep: tests/ray/test_compress.py
]  # fmt: skip
#: The run test_loom_run.py makes under :func:`e2e_storage`.
RUN_NAME = "e2e"


@pytest.fixture(scope="package")
def e2e_storage(tmp_path_factory) -> Path:
    """Where test_loom_run.py's run lives, for test_ray_up.py to start from (empty when that test did not run)."""
    return tmp_path_factory.mktemp("e2e-runs")
