"""Data steps on Arrow batches, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pipelines.data.dedup import ExactDedup, content_hash, mark_exact_duplicates
from pipelines.data.filters import LengthFilter
from pipelines.data.pack import pack
from pipelines.data.steps import Normalize, reason_key
from tests.helpers import document_table


def docs(*texts, reasons=None):
    return document_table(texts, source="s", reasons=reasons)


def test_normalize_folds_newlines_trailing_space_and_unicode():
    out = Normalize()._batch(docs("  a \r\nb\t\r\n\n", "e\u0301"))
    assert out.column("text").to_pylist() == ["a\nb", "\u00e9"]


def test_filter_marks_drops_with_step_and_reason_and_keeps_first_reason():
    out = LengthFilter(min_chars=5)._batch(
        docs("long enough", "tiny", "x", reasons=[None, None, "read: invalid utf-8"])
    )
    reasons = out.column("reject_reason").to_pylist()
    assert reasons == [None, "length: too_short (4 chars < 5)", "read: invalid utf-8"]
    assert reason_key(reasons[1]) == "length: too_short"


def _keepers(hashed: pa.Table) -> pa.Table:
    """What ExactDedup.apply's aggregation hands the marking: the smallest rank per hash held twice."""
    live = hashed.filter(pc.is_valid(hashed.column("content_hash")))
    grouped = live.group_by("content_hash").aggregate([("keeper_rank", "min"), ("keeper_rank", "count")])
    twice = grouped.filter(pc.greater(grouped.column("keeper_rank_count"), 1))
    return pa.table({"content_hash": twice.column("content_hash"), "keeper_rank": twice.column("keeper_rank_min")})


def test_exact_dedup_marks_every_copy_but_its_keeper_and_leaves_earlier_rejects():
    table = docs("same text", "same text", "other", "same text", reasons=[None, None, None, "length: too_short"])
    hashed = ExactDedup._hash(table)
    assert hashed.column("content_hash").to_pylist()[3] is None  # a reject takes no part
    marked = mark_exact_duplicates(hashed.take([1, 2, 0, 3]), _keepers(hashed))
    assert marked.column_names == table.column_names
    assert {r["doc_id"]: r["reject_reason"] for r in marked.to_pylist()} == {
        "d0": None,
        "d1": "exact_dedup: duplicate (of d0)",
        "d2": None,
        "d3": "length: too_short",
    }


def test_exact_dedup_keeps_one_of_two_rows_with_one_doc_id():
    """A file two sources both list: two rows, one doc_id, the same text; one is kept."""
    table = pa.concat_tables([document_table(["same"], ["d0"], source=name) for name in ("b", "a")])
    hashed = ExactDedup._hash(table)
    marked = mark_exact_duplicates(hashed, _keepers(hashed))
    assert marked.column("reject_reason").to_pylist() == ["exact_dedup: duplicate (of d0)", None]


def test_content_hash_ignores_case_and_whitespace_runs_only():
    assert content_hash("Hello   World\n") == content_hash("hello world ")
    assert content_hash("hello world") != content_hash("hello, world")


def test_pack_cuts_fixed_length_rows_and_drops_the_tail():
    ids = [[1, 2, 3, 0], [4, 5, 0], [6, 7, 8, 9, 0]]
    batch = pa.table({"ids": pa.array(ids, pa.list_(pa.int32())), "num_tokens": [4, 3, 5]})
    packed = pack(batch, seq_len=4)
    assert packed.column("input_ids").to_pylist() == [[1, 2, 3, 0], [4, 5, 0, 6], [7, 8, 9, 0]]
    # Positions restart where a document (or a row) starts: no position spans two documents.
    assert packed.column("position_ids").to_pylist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 2, 3]]


def test_mix_keeps_the_scarcest_source_whole_and_cuts_the_others():
    from pipelines.data.pack import mix_token_targets

    targets = mix_token_targets({"code": 600, "prose": 1000}, {"code": 0.6, "prose": 0.4})
    assert targets == {"code": 600, "prose": 400}  # 600 code tokens -> 400 prose tokens of 1000


def test_mix_rank_order_is_deterministic_and_keeps_up_to_the_cutoff():
    from pipelines.data.pack import _rank, keep_until_cutoff

    ids = [f"{i:016x}" for i in range(1000)]
    assert np.array_equal(_rank(0, ids), _rank(0, ids)) and not np.array_equal(_rank(0, ids), _rank(1, ids))
    batch = pa.table({"doc_id": ids, "source": ["a", "b"] * 500})
    median = int(np.median(_rank(0, ids[::2])))
    kept = keep_until_cutoff(batch, {"a": median, "b": None}, seed=0).column("source").to_pylist()
    assert kept.count("b") == 500 and kept.count("a") == 250


def test_the_mix_cut_keeps_the_ranks_nearest_the_target_across_batches():
    from pipelines.data.pack import cut_ranked

    rng = np.random.default_rng(0)
    sources = rng.choice(["a", "b"], 400)
    tokens = rng.integers(1, 50, 400)
    ranks = np.sort(rng.choice(2**40, 400, replace=False)).astype(np.uint64)

    def batches(size: int):
        for start in range(0, 400, size):
            yield pa.table(
                {
                    "source": sources[start : start + size].tolist(),
                    "rank": pa.array(ranks[start : start + size], pa.uint64()),
                    "num_tokens": tokens[start : start + size],
                }
            )

    for target in range(1, int(tokens[sources == "a"].sum()), 37):
        # Brute force: the prefix of source a's documents (in rank order) whose sum is nearest the target.
        sums = np.concatenate([[0], np.cumsum(tokens[sources == "a"])])
        best = int(np.argmin(np.abs(sums - target) - 1e-9 * (sums >= target)))
        expected_rank = int(ranks[sources == "a"][best - 1]) if best else -1
        for size in (1, 7, 400):  # a batch of one puts every crossing at a batch's first document
            cut = cut_ranked(batches(size), {"a": target})
            assert cut.cutoffs == {"a": expected_rank} and cut.tokens == {"a": int(sums[best])}, (target, size)


def test_mix_must_name_known_sources():
    import pytest

    from cluster.recipe import ConfigError, load_config
    from tests.conftest import TINY

    with pytest.raises(ConfigError, match="mix names unknown source 'prose'"):
        load_config(TINY, ["data.mix={stdlib: 0.5, prose: 0.5}"])


def test_the_tokenizer_sample_is_a_fraction_of_the_documents_whatever_the_blocks():
    from pipelines.data.stage import _doc_id_sample

    table = document_table([f"text {i}" for i in range(20_000)], [f"{i:016x}" for i in range(20_000)], source="s")
    whole = set(_doc_id_sample(table, fraction=0.25).column("doc_id").to_pylist())
    assert 0.23 < len(whole) / table.num_rows < 0.27
    in_blocks = set()
    for start in range(0, table.num_rows, 777):
        in_blocks.update(_doc_id_sample(table.slice(start, 777), fraction=0.25).column("doc_id").to_pylist())
    assert in_blocks == whole
    assert _doc_id_sample(table, fraction=1.0).num_rows == table.num_rows


def test_the_shuffle_key_is_set_by_a_rows_tokens_and_the_seed_alone():
    from pipelines.data.pack import SHUFFLE_KEY, with_shuffle_key

    def rows(*lists):
        return pa.table({"input_ids": pa.array([list(r) for r in lists], pa.list_(pa.int32()))})

    one = with_shuffle_key(rows([1, 2, 3], [4, 5, 6], [1, 2, 3]), seed=0).column(SHUFFLE_KEY).to_pylist()
    # The same tokens, the same key, whichever batch or position a row comes in; another order, another key.
    assert one[0] == one[2] != one[1]
    assert with_shuffle_key(rows([4, 5, 6]), seed=0).column(SHUFFLE_KEY).to_pylist() == [one[1]]
    assert with_shuffle_key(rows([3, 2, 1]), seed=0).column(SHUFFLE_KEY).to_pylist() != [one[0]]
    assert with_shuffle_key(rows([1, 2, 3]), seed=1).column(SHUFFLE_KEY).to_pylist() != [one[0]]
    assert len(with_shuffle_key(rows(), seed=0)) == 0
    with pytest.raises(ValueError, match="seq_len tokens"):
        with_shuffle_key(rows([1, 2, 3], [4, 5]), seed=0)
    assert np.unique(one).size == 2
