"""On a CUDA machine: the tiny chain's train stage in bf16 on GPU workers (skipped without CUDA)."""

from __future__ import annotations

import pytest

from pipelines.config import load_config
from tests.conftest import TINY

pytestmark = pytest.mark.gpu


def test_train_bf16_zero2_on_gpu(tmp_path):
    import ray
    import torch

    from cluster.connect import connect
    from pipelines.chain import run_stage

    gpus = torch.cuda.device_count()
    config = load_config(
        TINY,
        [
            f"storage={tmp_path}",
            "run_name=gpu",
            "data.max_documents=200",
            f"train.num_workers={min(2, gpus)}",
            "train.use_gpu=true",
            "train.precision=bf16",
            "train.max_steps=20",
        ],
    )
    connect(config.cluster)
    try:
        run_stage("data", config)
        record = run_stage("train", config)
    finally:
        ray.shutdown()
    assert record["metrics"]["step"] == 20
    assert record["metrics"]["last_loss"] < record["metrics"]["first_loss"]
