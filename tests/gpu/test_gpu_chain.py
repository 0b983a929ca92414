"""On a CUDA machine: the whole tiny chain on GPUs (skipped without CUDA).

data -> train (Ray Train workers on GPUs, DeepSpeed ZeRO-2 in bf16 over NCCL: every metric
all-reduce and held-out evaluation runs on the device) -> serve (vLLM's CUDA engine behind
Loom's ingress), queried through the ``openai`` client. Run with ``GPU=1 make setup`` first,
then ``.venv/bin/pytest tests/gpu -m gpu``.
"""

from __future__ import annotations

import math

import pytest

from cluster.recipe import load_config
from tests.conftest import TINY, free_port

pytestmark = pytest.mark.gpu


def test_tiny_chain_on_gpu(tmp_path):
    import openai
    import ray
    import torch

    from cluster.chain import run_stage
    from cluster.connect import connect
    from serve.stage import base_url, shutdown

    gpus = torch.cuda.device_count()
    workers = min(2, gpus)
    config = load_config(
        TINY,
        [
            f"storage={tmp_path}",
            "run_name=gpu",
            "tune.enabled=false",  # the sweep runs the same trainer: the GPU path is the training run's
            "data.max_documents=200",
            f"train.num_workers={workers}",
            "train.use_gpu=true",
            "train.zero_stage=2",
            "train.precision=bf16",
            "train.max_steps=20",
            "train.eval_every=10",
            "train.log_every=5",
            "serve.models.loom-tiny.accelerator=gpu",
            "serve.models.loom-tiny.engine.dtype=bfloat16",
            "serve.models.loom-tiny.engine.gpu_memory_utilization=0.2",
            f"serve.port={free_port()}",
        ],
    )
    connect(config.cluster)
    try:
        run_stage("data", config)
        trained = run_stage("train", config)
        assert trained["metrics"]["step"] == 20
        assert trained["metrics"]["last_loss"] < trained["metrics"]["first_loss"]
        assert math.isfinite(trained["metrics"]["val_loss"])

        served = run_stage("serve", config)
        assert served["metrics"]["demo_nonempty"] == served["metrics"]["demo_answers"] > 0
        client = openai.OpenAI(base_url=base_url(config.serve), api_key="unused-on-loopback")
        answer = client.completions.create(model="loom-tiny", prompt="def main(", max_tokens=8)
        assert answer.choices[0].text and answer.usage.completion_tokens > 0
    finally:
        shutdown()
        ray.shutdown()
