"""Every stage gives back what it reserved: once a stage ends, each placement group it created is removed.

A group left behind holds its CPUs for the cluster's lifetime, and every later stage waits for them: the serve
tests' deployment, or a user's next stage on a laptop's embedded Ray. Each stage fixture records the groups
created while it ran (tests/ray/conftest.py, ``stage_placement_groups``); the compression sweep's include those
of the driver killed half-way.
"""

from __future__ import annotations

import pytest

from tests.helpers import wait_released

pytestmark = pytest.mark.ray

#: Stage -> the fixture that runs it, and whether it reserves placement groups at all (Ray Data does not;
#: every trial of a sweep and every Ray Train run does).
STAGES = {
    "data": ("data_done", False),
    "tune": ("tune_done", True),
    "train": ("train_done", True),
    "lora": ("lora_done", True),
    "compress": ("compress_done", True),
}


@pytest.mark.parametrize("stage", STAGES)
def test_a_finished_stage_leaves_none_of_its_placement_groups_reserved(stage, request, stage_placement_groups):
    fixture, reserves = STAGES[stage]
    request.getfixturevalue(fixture)
    created = stage_placement_groups[stage]
    assert created or not reserves, f"the {stage} stage created no placement group: nothing was checked"
    wait_released(created, f"the {stage} stage's placement groups to be removed")


def test_what_a_finished_sweeps_trials_left_reserved_is_released_and_nothing_else(ray_cluster):
    import ray
    from ray.util.placement_group import placement_group

    from pipelines.sweeps import releasing_trials_placement_groups

    before = placement_group([{"CPU": 0.01}])  # another holder of this job's, from before the sweep
    ray.get(before.ready())
    try:
        with releasing_trials_placement_groups("tune"):
            left = placement_group([{"CPU": 0.01}])  # as a stopped trial's worker group is left
            ray.get(left.ready())
            # and one still waiting for room when the sweep ends, which would hold its CPUs once created
            pending = placement_group([{"CPU": 10_000}])
        wait_released([left.id.hex(), pending.id.hex()], "the trial's leftover groups to be removed")
        assert ray.util.placement_group_table()[before.id.hex()]["state"] == "CREATED"
    finally:
        ray.util.remove_placement_group(before)
