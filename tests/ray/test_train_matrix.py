"""The DeepSpeed matrix on 2 CPU workers: every ZeRO stage trains the tiny model with falling loss.

ZeRO-2 without offload is the recipe's own setup: the package's training run (train_done) is that case. ZeRO-0 is
the continued-pretraining run's (tests/ray/test_train_lora.py), which also reads rank 0's gauges from Ray's
Prometheus endpoint while it trains. Each training run costs about a minute of make test, so no case trains twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.train.config import TrainConfig
from tests.training import SHORT_RUN_LR, fit

pytestmark = pytest.mark.ray

CASES = {
    "zero1-checkpointing-offload-accumulation": {
        "zero_stage": 1,
        "activation_checkpointing": True,
        "offload_optimizer": True,
        "gradient_accumulation_steps": 2,
    },
    "zero3-offload-params-and-optimizer": {"zero_stage": 3, "offload_params": True, "offload_optimizer": True},
}


@pytest.mark.parametrize("case", list(CASES))
def test_zero_stage_trains_with_falling_loss(case, data_done, tiny_config, tmp_path):
    from pipelines.train.stage import read_loss_curve

    steps = 10
    config = TrainConfig.model_validate(
        {
            **tiny_config.train.model_dump(),
            **CASES[case],
            "max_steps": steps,
            "warmup_steps": 2,
            "lr": SHORT_RUN_LR,
            "log_every": 1,
            "checkpoint_every": steps,
        }
    )
    result, history = fit(config, tiny_config, tmp_path, case)
    curve = read_loss_curve(history)
    assert result.error is None and result.metrics["step"] == steps
    assert [point["step"] for point in curve] == list(range(1, steps + 1))
    first, last = curve[0]["loss"], curve[-1]["loss"]
    assert last < first - 0.5, curve  # a real drop, not noise (the loss starts near ln(vocab) ~ 6.9)
    assert (result.checkpoint.path and result.checkpoint.to_directory(str(tmp_path / "export"))) is not None
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_zero2_the_recipes_setup_trains_with_falling_loss(train_done, tiny_config):
    """The package's training run: the recipe's ZeRO-2, two workers, the sweep's learning rate."""
    from pipelines.train.stage import read_loss_curve

    assert tiny_config.train.zero_stage == 2 and not tiny_config.train.offload_optimizer
    curve = read_loss_curve(Path(train_done["outputs"]["metrics"]))
    steps = tiny_config.train.max_steps
    log_every = tiny_config.train.log_every
    assert [point["step"] for point in curve] == list(range(log_every, steps + 1, log_every))
    assert curve[-1]["loss"] < curve[0]["loss"] - 0.5, curve
