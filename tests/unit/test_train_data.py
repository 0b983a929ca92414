"""The training data position (pipelines/train/loop.py) without Ray: which micro-batches each rank takes, from a
position, at any worker count, and the held-out rows every rank scores the same number of passes over."""

from __future__ import annotations

import numpy as np

from pipelines.train.loop import _batches, held_out_batches

MICRO = 2


class RowsShard:
    """The one method of a Ray Data shard the loop uses, over rows whose first token is their row number."""

    def __init__(self, rows: int):
        self.rows = rows

    def iter_torch_batches(self, batch_size, collate_fn, drop_last):
        for start in range(0, self.rows - batch_size + 1 if drop_last else self.rows, batch_size):
            ids = [np.array([row, row], dtype=np.int32) for row in range(start, start + batch_size)]
            yield collate_fn({"input_ids": ids})


def taken(shard, skip: int, world: int, limit: int, rounds: int | None = None) -> list[int]:
    """Micro-batch indices every rank takes from ``skip`` (``rounds`` rounds of them, or to the limit)."""
    per_rank = [list(_batches(shard, MICRO, skip, rank, world, limit)) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # whole rounds: the same number of steps on every rank
    indices = []
    for round_ in zip(*per_rank, strict=True):
        if rounds is not None and len(indices) == rounds * world:
            break
        for index, batch in round_:
            assert int(batch["input_ids"][0, 0]) == index * MICRO  # the rows of that micro-batch
            indices.append(index)
    return indices


def test_a_resized_group_takes_up_where_the_other_left_off():
    shard = RowsShard(rows=2 * 25)  # 25 micro-batches
    per_step, limit = 6, 24  # 6 micro-batches a step at 3 or 2 workers; the epoch is 4 whole steps
    first = taken(shard, 0, world=3, limit=limit, rounds=4)  # two steps at three workers (2 rounds each)
    position = len(first)
    assert position == 2 * per_step
    rest = taken(shard, position, world=2, limit=limit)  # the rest of the epoch at two workers
    assert sorted(first + rest) == list(range(limit))  # each micro-batch once, none past the epoch's last step


def test_every_rank_scores_the_same_number_of_held_out_passes():
    shard = RowsShard(rows=2 * 5)  # 5 held-out micro-batches
    ranks = [held_out_batches(shard, MICRO, rank, 2, total=8) for rank in range(2)]
    assert [len(batches) for batches in ranks] == [3, 3]
    counted = sorted(int(batch["input_ids"][0, 0]) for batches in ranks for batch, counts in batches if counts)
    assert counted == [0, 2, 4, 6, 8]  # each of the five once; rank 1's third pass is a repeat, not counted
    assert [counts for _, counts in ranks[1]] == [True, True, False]
