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
    ds = deepspeed_config(train, train.num_workers)
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["train_batch_size"] == train.micro_batch_size * 2 * train.num_workers
    assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) == (stage == 3)
    assert "bf16" not in ds and "fp16" not in ds


def test_bf16_on_gpu_recipe():
    train = load_config(TINY.parent / "gpu-125m.yaml").train
    assert deepspeed_config(train, train.num_workers)["bf16"] == {"enabled": True}


def test_warmup_then_cosine_to_floor():
    factor = warmup_cosine(warmup_steps=4, max_steps=20, floor=0.1)
    warm = [factor(s) for s in range(4)]
    assert warm == sorted(warm) and warm[-1] < 1
    assert factor(4) == pytest.approx(1.0)
    assert factor(20) == pytest.approx(0.1)
    assert factor(12) == pytest.approx(0.55)


def test_offload_and_checkpointing_reach_the_deepspeed_config():
    train = load_config(TINY, ["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true"]).train
    zero = deepspeed_config(train, train.num_workers)["zero_optimization"]
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


def test_an_elastic_worker_count_keeps_the_global_batch():
    train = load_config(TINY, ["train.num_workers=[2, 3]", "train.gradient_accumulation_steps=2"]).train
    assert train.elastic and (train.min_workers, train.max_workers) == (2, 3)
    global_batch = train.micro_batch_size * 2 * 3
    for world, accumulation in ((2, 3), (3, 2)):
        ds = deepspeed_config(train, world)
        assert ds["gradient_accumulation_steps"] == accumulation
        assert ds["train_batch_size"] == global_batch == ds["train_micro_batch_size_per_gpu"] * accumulation * world
    assert "checkpoint" not in deepspeed_config(train, 2)
    assert deepspeed_config(train, 2, load_universal=True)["checkpoint"] == {"load_universal": True}
    with pytest.raises(ValueError, match=r"4 workers is outside train.num_workers=\(2, 3\)"):
        train.accumulation_at(4)
    # A sweep's trials and a compression student carry the range and the batch.
    trial = train.for_trial({}, steps=4, workers=(1, 2))
    assert trial.num_workers == (1, 2) and trial.effective_global_batch_size == global_batch
    assert trial.accumulation_at(1) == 2 * trial.accumulation_at(2)


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (
            ["train.num_workers=[3, 2]"],
            "train.num_workers",
            "an elastic range [min, max] needs 1 <= min <= max (got [3, 2])",
        ),
        (
            ["train.num_workers=[1, 2, 3]"],
            "train.num_workers",
            "an elastic range is two whole numbers, [min, max] (got [1, 2, 3])",
        ),
        (["train.num_workers=0"], "train.num_workers", "at least 1 worker (got 0)"),
        (
            ["train.num_workers=[2, 3]"],
            "train.num_workers",
            "the global batch of 48 sequences is not a whole number of micro-batches (16 sequences) per worker with 2 "
            "workers (the global batch stays fixed as workers come and go); the smallest that fits every count in "
            "[2, 3] is gradient_accumulation_steps=2",
        ),
        (
            ["train.num_workers=[1, 2]", "train.wait_for_nodes_s=30"],
            "train.wait_for_nodes_s",
            "has no effect with an elastic num_workers: leave it unset",
        ),
    ],
)
def test_bad_elastic_worker_counts_are_named(overrides, key, message):
    from cluster.recipe import ConfigError

    with pytest.raises(ConfigError) as caught:
        load_config(TINY, overrides)
    assert dict(caught.value.problems)[key] == message


def _checkpoint(tmp_path, state):
    import json

    from ray.train import Checkpoint

    from pipelines.train.loop import RUN_STATE

    (tmp_path / RUN_STATE).write_text(json.dumps(state))
    return Checkpoint.from_directory(str(tmp_path))


def test_a_checkpoint_loads_at_any_worker_count_but_not_with_another_batch(tmp_path):
    from pipelines.train.loop import restore_point

    state = {"epoch": 0, "data_position": 12, "step": 3, "world_size": 2, "micro_batch_size": 16}
    train = load_config(TINY, ["train.num_workers=[1, 2]"]).train  # global batch 32
    saved = restore_point(_checkpoint(tmp_path, {**state, "global_batch_size": 32}), train, 1)
    assert saved["data_position"] == 12 and saved["world_size"] == 2
    with pytest.raises(RuntimeError, match=r"written with train.global_batch_size=64 \(now 32\)"):
        restore_point(_checkpoint(tmp_path, {**state, "global_batch_size": 64}), train, 2)


def test_a_checkpoint_from_before_positions_counted_micro_batches_is_read_in_micro_batches(tmp_path):
    from pipelines.train.loop import restore_point

    train = load_config(TINY, ["train.num_workers=2"]).train
    legacy = {"epoch": 1, "data_position": 6, "step": 3, "world_size": 2}  # 6 rounds of 2 micro-batches
    assert restore_point(_checkpoint(tmp_path, legacy), train, 2)["data_position"] == 12
    with pytest.raises(RuntimeError, match="resume it with train.num_workers=2 once"):
        restore_point(_checkpoint(tmp_path, legacy), train, 1)


def test_an_elastic_trial_drops_the_fixed_count_wait():
    train = load_config(TINY, ["train.wait_for_nodes_s=30"]).train
    assert train.for_trial({}, steps=4, workers=(1, 2)).wait_for_nodes_s is None
    assert train.for_trial({}, steps=4, workers=2).wait_for_nodes_s == 30


def test_an_elastic_trial_checkpoints_at_the_recipe_cadence():
    """A resize goes on from the last checkpoint: an elastic trial keeps the recipe's cadence (within its budget);
    a fixed-count trial checkpoints once, at its end."""
    train = load_config(TINY, ["train.checkpoint_every=4"]).train
    assert train.for_trial({}, steps=10, workers=(1, 2)).checkpoint_every == 4
    assert train.for_trial({}, steps=3, workers=(1, 2)).checkpoint_every == 3
    assert train.for_trial({}, steps=10, workers=2).checkpoint_every == 10


def test_the_ray_internals_an_elastic_fit_refreshes_the_node_view_through_are_where_it_expects():
    """pipelines.train.trainer.fresh_node_view ticks Ray Data's autoscaling coordinator, the one Ray Train's elastic
    policy counts nodes through: if Ray moves any of this, an elastic resize falls back to the coordinator's 20 s
    tick (only a warning at run time), so it must fail here when the pinned Ray is upgraded."""
    import inspect

    from ray.data._internal.cluster_autoscaler import default_autoscaling_coordinator as coordinator
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client, elastic

    recompute = inspect.signature(coordinator._AutoscalingCoordinatorActor.get_reserved_resources).parameters
    assert "recompute" in recompute, recompute
    assert coordinator._AutoscalingCoordinatorActor.TICK_INTERVAL_S == 20  # what the refresh shortens
    # Train's client gets its coordinator from the same function (the named, detached actor), and the elastic policy
    # sizes restarts and resizes from that coordinator's reservations.
    client = inspect.getsource(autoscaling_coordinator_client.TrainAutoscalingCoordinatorClient)
    assert "get_or_create_autoscaling_coordinator()" in client
    assert "get_reserved_resources.remote" in inspect.getsource(elastic.ElasticScalingPolicy._get_reserved_resources)
