"""DeepSpeed config and LR schedule built from the recipe."""

from __future__ import annotations

import pytest

from cluster.recipe import load_config
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


def test_offload_and_checkpointing_reach_the_deepspeed_config():
    train = load_config(TINY, ["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true"]).train
    zero = deepspeed_config(train)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"


def test_bad_deepspeed_combinations_are_all_reported_with_their_keys():
    from cluster.recipe import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(
            TINY,
            [
                "train.zero_stage=0",
                "train.precision=fp16",
                "train.offload_optimizer=true",
                "train.offload_params=true",
                "train.global_batch_size=7",
            ],
        )
    problems = dict(caught.value.problems)
    assert problems == {
        "train.precision": "'fp16' needs use_gpu: true (CPU has no fp16 kernels for training)",
        "train.global_batch_size": "7 must equal micro_batch_size (16) x gradient_accumulation_steps (1) "
        "x num_workers (2) = 32",
        "train.offload_optimizer": "needs zero_stage >= 1 (ZeRO partitions what it offloads)",
        "train.offload_params": "needs zero_stage 3 (got 0)",
    }


def test_flops_per_token_and_mfu():
    from pipelines.train.metrics import flops_per_token, mfu

    # 125M parameters, 12 layers x 768, 2048 tokens: 6N dominates, attention adds 12*12*768*2048.
    flops = flops_per_token(125_000_000, 12, 768, 2048)
    assert flops == 6 * 125e6 + 12 * 12 * 768 * 2048
    assert mfu(400_000, flops, 989e12) == pytest.approx(400_000 * flops / 989e12)
    assert mfu(400_000, flops, None) is None  # CPU: no peak, no MFU
