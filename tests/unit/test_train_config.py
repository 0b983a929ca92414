"""DeepSpeed config and LR schedule built from the recipe."""

from __future__ import annotations

import pytest

from pipelines.config import load_config
from pipelines.train.deepspeed_config import deepspeed_config
from pipelines.train.loop import warmup_cosine
from tests.conftest import TINY


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_matches_recipe(stage):
    train = load_config(TINY, [f"train.zero_stage={stage}", "train.gradient_accumulation_steps=2"]).train
    ds = deepspeed_config(train)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == train.micro_batch_size * 2 * train.num_workers
    assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) == (stage == 3)
    assert "bf16" not in ds and "fp16" not in ds


def test_bf16_on_gpu_recipe():
    train = load_config(TINY.parent / "gpu-125m.yaml").train
    assert deepspeed_config(train)["bf16"] == {"enabled": True}


def test_warmup_then_cosine_to_floor():
    factor = warmup_cosine(warmup_steps=4, max_steps=20, floor=0.1)
    warm = [factor(s) for s in range(4)]
    assert warm == sorted(warm) and warm[-1] < 1
    assert factor(4) == pytest.approx(1.0)
    assert factor(20) == pytest.approx(0.1)
    assert factor(12) == pytest.approx(0.55)
