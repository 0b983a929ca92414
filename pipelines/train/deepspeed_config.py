"""The DeepSpeed config a recipe's ``train`` section asks for."""

from __future__ import annotations

from typing import Any

from pipelines.train.config import TrainConfig


def deepspeed_config(config: TrainConfig, world: int, load_universal: bool = False) -> dict[str, Any]:
    """The config of a group of ``world`` ranks (accumulation makes up the global batch); ``load_universal``: the
    engine will load a universal checkpoint (ZeRO state written by another worker count, see ``reshard``)."""
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.accumulation_at(world),
        "train_batch_size": config.effective_global_batch_size,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "steps_per_print": 10**9,  # Loom reports its own metrics
        "wall_clock_breakdown": False,
    }
    if config.offload_optimizer:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": config.use_gpu}
        # Loom hands DeepSpeed a torch AdamW; DeepSpeed would otherwise insist on its CPUAdam.
        ds["zero_force_ds_cpu_optimizer"] = False
    if config.offload_params:
        ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": config.use_gpu}
    if config.zero_stage == 3:
        ds["zero_optimization"].update(
            {"stage3_gather_16bit_weights_on_model_save": True, "stage3_param_persistence_threshold": 0}
        )
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    if config.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif config.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds
