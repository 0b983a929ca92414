"""ZeRO state written by one worker count and loaded by another (pipelines/train/reshard.py): after DeepSpeed's
universal checkpoint, every parameter's fp32 master copy and both Adam moments are what the writers held,
bit for bit, and the client state (data position) comes through. Real DeepSpeed ranks over gloo, in processes."""

from __future__ import annotations

import os

import pytest

from pipelines.train.reshard import needs_universal, to_universal
from tests.conftest import free_port

GLOBAL_BATCH, MICRO = 8, 2


def _rank(rank, world, port, stage, mode, directory, out):
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": GLOBAL_BATCH // (MICRO * world),
        "train_batch_size": GLOBAL_BATCH,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if mode == "load":
        config["checkpoint"] = {"load_universal": True}
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2), config=config
    )
    if mode == "save":
        data = torch.Generator().manual_seed(rank)
        for _ in range(3 * engine.gradient_accumulation_steps()):
            engine.backward(engine(torch.randn(MICRO, 16, generator=data)).pow(2).mean())
            engine.step()
        engine.save_checkpoint(directory, tag="t", client_state={"data_position": 24})
        client = {"data_position": 24}
    else:
        _, client = engine.load_checkpoint(directory, tag="t")
    state = {
        name: [safe_get_full_fp32_param(p)]
        + [safe_get_full_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq")]
        for name, p in engine.module.named_parameters()
    }
    if rank == 0:
        torch.save({"state": state, "client": client, "steps": engine.global_steps}, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize(("stage", "written_by", "loaded_by"), [(2, 2, 1), (3, 1, 2)])
def test_zero_state_is_resharded_for_another_worker_count(tmp_path, stage, written_by, loaded_by):
    import torch
    import torch.multiprocessing as mp

    assert needs_universal(stage, written_by, loaded_by) and not needs_universal(0, written_by, loaded_by)
    before, after = tmp_path / "before.pt", tmp_path / "after.pt"
    mp.spawn(
        _rank, args=(written_by, free_port(), stage, "save", str(tmp_path / "ckpt"), str(before)), nprocs=written_by
    )
    universal = to_universal(tmp_path / "ckpt", "t", tmp_path / "universal")
    mp.spawn(_rank, args=(loaded_by, free_port(), stage, "load", str(universal), str(after)), nprocs=loaded_by)
    saved, loaded = torch.load(before), torch.load(after)
    assert loaded["client"]["data_position"] == 24 and loaded["steps"] == saved["steps"] == 3
    assert saved["state"].keys() == loaded["state"].keys()
    for name, tensors in saved["state"].items():
        for kind, want, got in zip(("fp32", "exp_avg", "exp_avg_sq"), tensors, loaded["state"][name], strict=True):
            assert want.abs().sum() > 0, (name, kind)  # trained state, not zeros on both sides
            assert torch.equal(want, got), (name, kind, (want - got).abs().max())


def test_a_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint 'deepspeed' in"):
        to_universal(tmp_path, "deepspeed", tmp_path / "out")
