"""Curation on the local Ray cluster: near-dedup quality and determinism, components, resume."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pytest

from pipelines.data.config import DataConfig
from pipelines.data.dedup import MinHashDedup
from pipelines.data.utils import hash_shuffled, shuffled_by
from tests.helpers import document_table, union_find_roots
from tests.planted_corpus import planted_corpus

pytestmark = pytest.mark.ray


def as_dataset(documents: list[tuple[str, str]], blocks: int):
    import ray.data

    table = document_table([text for _, text in documents], [doc_id for doc_id, _ in documents], source="planted")
    return ray.data.from_arrow(table).repartition(blocks)


def dropped_ids(ds) -> dict[str, str]:
    return {row["doc_id"]: row["reject_reason"] for row in ds.take_all() if row["reject_reason"] is not None}


@pytest.fixture(scope="module")
def corpus():
    corpus = planted_corpus(bases=40, variants_per_base=2, hard_negatives=40, uniques=80, seed=7)
    # The planted pairs sit well on either side of the 0.8 threshold.
    assert corpus.min_positive_jaccard >= 0.9 and corpus.max_negative_jaccard <= 0.5
    return corpus


@pytest.fixture(scope="module")
def first_run(ray_cluster, corpus):
    step = MinHashDedup(threshold=0.8, num_perm=128, num_partitions=2)
    return step, dropped_ids(step.apply(as_dataset(corpus.documents, blocks=2)))


def test_near_duplicates_are_found_with_high_precision_and_recall(first_run, corpus):
    step, dropped = first_run
    expected = corpus.expected_drops()
    found = set(dropped)
    precision = len(found & expected) / len(found)
    recall = len(found & expected) / len(expected)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)
    assert not found & set(corpus.hard_negatives)
    # The survivor of each cluster is its smallest doc_id, and the reason names it.
    for cluster in corpus.clusters:
        survivor = min(cluster)
        assert survivor not in found
        assert all(dropped[d] == f"minhash_dedup: near-duplicate (of {survivor})" for d in cluster if d in found)
    assert step.stats()["duplicate_clusters"] == len(corpus.clusters)
    assert step.stats()["cluster_size_histogram"] == {"3": len(corpus.clusters)}


def test_survivors_are_the_same_across_partitions_blocks_components_verification_and_shuffles(first_run, corpus):
    _, dropped = first_run
    # Components distributed to the end here (the first run finished its small graph in one process).
    other = MinHashDedup(threshold=0.8, num_perm=128, num_partitions=3, verify=True, local_components_edges=0)
    assert dropped_ids(other.apply(as_dataset(corpus.documents, blocks=5))) == dropped
    # And with the data stage's other shuffle (data.shuffle: sort): tasks in place of Ray's aggregator actors.
    with shuffled_by("sort"):
        assert dropped_ids(other.apply(as_dataset(corpus.documents, blocks=5))) == dropped


def test_uint64_keys_are_grouped_by_hash_under_the_sort_shuffle(ray_cluster):
    """Ray Data 2.60's sort-based aggregation fails on uint64 keys above 2**63 (they become pickled objects): the
    dedup's and components' group-bys on hashes and node ids keep the hash shuffle (pipelines.data.utils)."""
    import numpy as np
    import ray.data
    from ray.data.aggregate import Count
    from ray.data.expressions import col

    keys = np.random.default_rng(0).integers(0, 2**64 - 1, size=20_000, dtype=np.uint64)
    table = pa.table({"bucket": pa.array(np.concatenate([keys, keys[:5_000]]), pa.uint64())})
    with shuffled_by("sort"):
        ds = hash_shuffled(ray.data.from_arrow(table).repartition(8))
        counted = ds.groupby("bucket", num_partitions=3).aggregate(Count(alias_name="n"))
        assert counted.filter(expr=col("n") == 2).count() == 5_000


def test_simhash_finds_the_same_planted_clusters(ray_cluster, corpus):
    from pipelines.data.dedup import SimHashDedup

    step = SimHashDedup(max_hamming=6, ngram=3, num_partitions=2)
    dropped = dropped_ids(step.apply(as_dataset(corpus.documents, blocks=3)))
    expected = corpus.expected_drops()
    assert len(set(dropped) & expected) / len(expected) >= 0.95
    assert not set(dropped) - expected
    assert all(reason.startswith("simhash_dedup: near-duplicate (of ") for reason in dropped.values())


def test_near_dedup_at_the_default_config_finds_near_duplicates_at_the_threshold(ray_cluster):
    """The recipe's default minhash_dedup (threshold 0.8) on near-copies planted with a true word 5-gram
    Jaccard spread over [0.80, 0.95] to their base, and hard negatives in [0.40, 0.50): F1 >= 0.95 against
    the planted truth and no hard negative removed. The old defaults (bands for a balanced error at the
    threshold, no verification) scored F1 0.83 here."""
    from pipelines.data.config import MinHashDedupStep

    corpus = planted_corpus(
        bases=150, variants_per_base=2, hard_negatives=150, uniques=300, seed=24,
        positive_jaccard=(0.8, 0.95), negative_jaccard=(0.4, 0.5),
    )  # fmt: skip
    assert 0.8 <= corpus.min_positive_jaccard and max(corpus.positive_jaccards.values()) <= 0.95
    assert sum(j < 0.85 for j in corpus.positive_jaccards.values()) >= 60  # many right at the threshold
    assert 0.4 <= min(corpus.negative_jaccards.values()) and corpus.max_negative_jaccard < 0.5
    step = MinHashDedupStep(type="minhash_dedup").build()
    found, expected = set(dropped_ids(step.apply(as_dataset(corpus.documents, blocks=2)))), corpus.expected_drops()
    hits = len(found & expected)
    precision, recall = hits / max(1, len(found)), hits / len(expected)
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    assert f1 >= 0.95, (f1, precision, recall)
    assert not found & set(corpus.hard_negatives)


def test_connected_components_match_union_find(ray_cluster):
    import ray.data

    from pipelines.data.components import connected_components

    rng = random.Random(5)
    nodes = [rng.getrandbits(63) for _ in range(300)]
    edges = [(rng.choice(nodes), rng.choice(nodes)) for _ in range(220)]
    # A long path: the worst case for label propagation, a few rounds for large/small-star.
    edges += list(zip(nodes[:40], nodes[1:41], strict=True))

    roots = union_find_roots(nodes, edges)
    expected = {n: root for n, root in roots.items() if n != root}

    table = pa.table(
        {"u": pa.array([u for u, _ in edges], pa.uint64()), "v": pa.array([v for _, v in edges], pa.uint64())}
    )
    edges = ray.data.from_arrow(table).repartition(3)
    # Distributed rounds to the end; rounds until 100 edges are left, then one process; one process from the start.
    for local_edges in (0, 240, 10_000):
        result = connected_components(edges, num_partitions=2, local_edges=local_edges)
        assert {row["u"]: row["v"] for row in result.take_all()} == expected, local_edges


def test_curation_resumes_after_the_last_finished_step(ray_cluster, corpus, tmp_path):
    from pipelines.data.stage import curate
    from pipelines.runs import MARKER

    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for _, text in corpus.documents[:60]))
    config = DataConfig.model_validate(
        {
            "sources": [{"format": "jsonl", "path": str(source), "name": "planted"}],
            "steps": [
                {"type": "normalize"},
                {"type": "length", "min_chars": 10},
                {"type": "exact_dedup", "num_partitions": 2},
            ],
        }
    )
    _, funnel, _ = curate(config, tmp_path / "data")
    last = tmp_path / "data" / "steps" / "03-exact_dedup"
    (last / MARKER).unlink()  # as if the run died while writing the last step
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "steps" / "01-normalize").iterdir()}
    _, again, _ = curate(config, tmp_path / "data")
    assert again == funnel
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data" / "steps" / "01-normalize").iterdir()} == before
    assert (last / MARKER).is_file()


def test_domain_mix_matches_the_weights_and_reaches_the_shards(ray_cluster, tmp_path):
    import pyarrow.parquet as pq

    from pipelines.data.stage import run_data
    from pipelines.runs import RunDir

    prose = planted_corpus(bases=0, uniques=600, words=120, seed=3)
    source = tmp_path / "prose.jsonl"
    source.write_text("".join(json.dumps({"text": text}) + "\n" for _, text in prose.documents))
    config = DataConfig.model_validate(
        {
            "sources": [
                {"format": "stdlib", "name": "code"},
                {"format": "jsonl", "path": str(source), "name": "prose"},
            ],
            "max_documents": 600,
            "steps": [{"type": "normalize"}, {"type": "length", "min_chars": 32}],
            "mix": {"code": 0.6, "prose": 0.4},
            "vocab_size": 512,
            "seq_len": 64,
            "val_fraction": 0.0,
            "tokenize_actors": 1,
        }
    )
    run_data(config, RunDir(tmp_path / "run"), seed=0)
    stats = json.loads((tmp_path / "run" / "data" / "stats.json").read_text())
    mix = stats["mix"]
    assert abs(mix["code"]["share"] - 0.6) <= 0.02 and abs(mix["prose"]["share"] - 0.4) <= 0.02, mix
    # One source was cut to fit the other's weight; both reached the packed shards.
    assert any(m["tokens_after"] < m["tokens_before"] for m in mix.values())
    assert pq.read_table(tmp_path / "run" / "data" / "train").num_rows == stats["sequences"]["train"] > 0


def test_perplexity_filter_drops_the_planted_gibberish(train_done, tmp_path):
    from pipelines.data.perplexity import PerplexityFilter

    rng = random.Random(1)
    code = [
        "def add(a, b):\n    return a + b\n",
        "import os\nimport sys\n\n\ndef main():\n    print(os.getcwd(), sys.argv)\n",
        "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
        "for index in range(10):\n    if index % 2 == 0:\n        print(index)\n",
        "try:\n    value = int(text)\nexcept ValueError:\n    value = None\n",
        "def read(path):\n    with open(path) as handle:\n        return handle.read()\n",
    ]
    gibberish = ["".join(rng.choices("qzxjvkw#@~^%&ÿþ¤", k=160)) for _ in range(2)]
    documents = [(f"{i:016x}", text) for i, text in enumerate(code + gibberish)]
    # Code scores a few hundred under the briefly trained model, the gibberish about 3x that.
    step = PerplexityFilter(model_path=train_done["outputs"]["model"], max_relative_to_median=2.0)
    dropped = dropped_ids(step.apply(as_dataset(documents, blocks=2)))
    assert set(dropped) == {doc_id for doc_id, text in documents if text in gibberish}, step.stats()
    assert all(reason.startswith("perplexity: too_high (") for reason in dropped.values())
    stats = step.stats()
    assert stats["rule"].startswith("2.0x median") and sum(stats["histogram"]["counts"]) == len(documents)


def test_documents_keep_their_identity_through_steps_rejects_and_dedup(ray_cluster, corpus, tmp_path):
    """Two identical parquet records stay two documents; a source's own ids and chosen metadata ride
    through every step into the rejects, and a near-duplicate's reason leads back to its survivor."""
    import pyarrow.parquet as pq

    from pipelines.data.stage import curate
    from pipelines.data.steps import split_kept

    twin = "An identical record, written twice into one parquet file, long enough to pass the filter."
    base, variant = sorted(corpus.clusters[0])[:2]  # two members of a planted near-duplicate cluster
    texts = dict(corpus.documents)
    records = [
        {"uid": "rec-1", "lang": "en", "text": twin},
        {"uid": "rec-2", "lang": "en", "text": twin},
        {"uid": "rec-3", "lang": "de", "text": "short"},
        {"uid": "rec-4", "lang": "fr", "text": texts[base]},
        {"uid": "rec-5", "lang": "fr", "text": texts[variant]},
    ]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "records.parquet")
    (tmp_path / "lines.jsonl").write_text(json.dumps({"id": 7, "text": "tiny", "lang": "it"}) + "\n")
    config = DataConfig.model_validate(
        {
            "sources": [
                {"format": "parquet", "path": str(tmp_path / "records.parquet"), "name": "p", "id_field": "uid",
                 "metadata_fields": ["lang"]},
                {"format": "jsonl", "path": str(tmp_path / "lines.jsonl"), "name": "j", "id_field": "id",
                 "metadata_fields": ["lang"]},
            ],
            "steps": [
                {"type": "normalize"},
                {"type": "length", "min_chars": 10},
                {"type": "exact_dedup", "num_partitions": 2},
                {"type": "minhash_dedup", "threshold": 0.8, "num_perm": 128, "num_partitions": 2},
            ],
        }
    )  # fmt: skip
    marked, _, _ = curate(config, tmp_path / "data")
    rows = {row["source_id"]: row for row in marked.take_all()}
    assert set(rows) == {"rec-1", "rec-2", "rec-3", "rec-4", "rec-5", "7"}
    assert rows["rec-1"]["doc_id"] != rows["rec-2"]["doc_id"]  # from path + row index, not text
    assert {json.loads(row["metadata"])["lang"] for row in rows.values()} == {"en", "de", "fr", "it"}

    kept, rejects = split_kept(marked)
    rejected = {row["source_id"]: row for row in rejects.take_all()}
    # Of each duplicate pair the smaller doc_id survives, and the other's reason names it.
    twins = sorted(["rec-1", "rec-2"], key=lambda uid: rows[uid]["doc_id"])
    near = sorted(["rec-4", "rec-5"], key=lambda uid: rows[uid]["doc_id"])
    assert set(rejected) == {twins[1], near[1], "rec-3", "7"}
    assert rejected[twins[1]]["reject_reason"] == f"exact_dedup: duplicate (of {rows[twins[0]]['doc_id']})"
    assert rejected[near[1]]["reject_reason"].startswith("minhash_dedup:")
    assert rows[near[0]]["doc_id"] in rejected[near[1]]["reject_reason"]
    assert rejected["rec-3"]["reject_reason"].startswith("length: too_short")
    assert json.loads(rejected["7"]["metadata"]) == {"lang": "it"}
    assert {row["source_id"] for row in kept.take_all()} == {twins[0], near[0]}


def test_quality_classifier_drops_planted_junk_with_the_score_in_the_reason(ray_cluster):
    """The quality_classifier step through the data-step machinery: trained on a reference source against a
    junk source, it scores every kept row in its actor pool and drops the web corpus's planted junk, each
    reject carrying its score. Clear-cut junk kinds (word salad, which bag-of-n-grams features cannot tell
    from prose, is measured by the benchmark)."""
    import ray.data

    from pipelines.data.config import QualityClassifierStep
    from tests.quality_corpus import JUNK_KINDS, quality_corpus

    corpus = quality_corpus(reference=120, junk=120, web=200, junk_share=0.25, seed=4, kinds=JUNK_KINDS[:4])
    tables = [
        document_table([t for _, t in docs], [d for d, _ in docs], source=source)
        for source, docs in corpus.sources.items()
    ]
    ds = ray.data.from_arrow(pa.concat_tables(tables)).repartition(3)
    step = QualityClassifierStep(
        type="quality_classifier", positive_sources=["reference"], negative_sources=["junk"], threshold=0.5,
        hash_bits=16, batch_size=64,
    ).build()  # fmt: skip
    rows = {row["doc_id"]: row for row in step.apply(ds).take_all()}
    web = {doc_id for doc_id, _ in corpus.sources["web"]}
    dropped = {doc_id for doc_id in web if rows[doc_id]["reject_reason"] is not None}
    hits = len(dropped & corpus.planted_junk)
    precision, recall = hits / max(1, len(dropped)), hits / len(corpus.planted_junk)
    assert 2 * precision * recall / (precision + recall) >= 0.95, (precision, recall)
    for doc_id in dropped:
        score = rows[doc_id]["quality_score"]
        assert rows[doc_id]["reject_reason"] == f"quality_classifier: low_score (score {score:.3f} < 0.500, threshold)"
    assert all(rows[d]["reject_reason"] for d, _ in corpus.sources["junk"])  # the junk source goes too
    stats = step.stats()
    assert stats["train_documents"]["positive"] + stats["holdout_documents"]["positive"] == 120
    assert stats["holdout"]["f1"] >= 0.95, stats


def test_quality_classifier_learns_from_the_heuristics_rejects_and_keeps_a_fraction(ray_cluster):
    """Negatives from the rejects of earlier steps (gopher_quality, repetition), keep_fraction instead of a
    threshold: about that share of the scored rows is kept, and the rows the heuristics dropped keep their
    first reason."""
    import ray.data

    from pipelines.data.config import GopherQualityStep, QualityClassifierStep, RepetitionStep
    from tests.quality_corpus import quality_corpus

    corpus = quality_corpus(reference=100, junk=0, web=200, junk_share=0.4, seed=5, kinds=("symbol_soup", "log_lines"))
    tables = [
        document_table([t for _, t in docs], [d for d, _ in docs], source=source)
        for source, docs in corpus.sources.items()
        if docs
    ]
    ds = ray.data.from_arrow(pa.concat_tables(tables)).repartition(2)
    for config in (GopherQualityStep(type="gopher_quality"), RepetitionStep(type="repetition")):
        ds = config.build().apply(ds)
    before = {row["doc_id"]: row["reject_reason"] for row in ds.take_all()}
    heuristics = {doc_id for doc_id, reason in before.items() if reason}
    assert len(heuristics & corpus.planted_junk) >= 40  # enough negatives to learn from
    step = QualityClassifierStep(
        type="quality_classifier", positive_sources=["reference"], negatives_from_steps=["gopher_quality", "repetition"],
        keep_fraction=0.9, hash_bits=16, holdout_fraction=0.0,
    ).build()  # fmt: skip
    rows = step.apply(ds).take_all()
    scored = [row for row in rows if row["quality_score"] is not None]
    kept = [row for row in scored if row["reject_reason"] is None]
    assert abs(len(kept) / len(scored) - 0.9) <= 0.05, (len(kept), len(scored))
    assert all(row["reject_reason"] == before[row["doc_id"]] for row in rows if row["doc_id"] in heuristics)
    assert all("keep_fraction 0.9)" in row["reject_reason"] for row in scored if row["reject_reason"])
    assert step.stats()["rule"] == "keep_fraction 0.9"


def test_packed_rows_do_not_depend_on_the_blocks_the_documents_came_in(ray_cluster):
    """The same documents in 3 or 17 blocks (what a different cluster size or a lost node gives) pack and shuffle
    into the same rows in the same order; Ray's random_shuffle ordered them by block, which differed."""
    import hashlib

    import numpy as np
    import ray.data

    from pipelines.data.pack import packed_in_order

    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=rng.integers(5, 300)).astype(np.int32) for _ in range(1500)]
    offsets = np.concatenate([[0], np.cumsum([len(doc) for doc in docs])]).astype(np.int32)
    table = pa.table(
        {
            "ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(docs))),
            "num_tokens": pa.array([len(doc) for doc in docs], pa.int64()),
        }
    )
    context = ray.data.DataContext.get_current()
    before, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    try:
        digests = []
        for blocks in (3, 17):
            packed = packed_in_order(ray.data.from_arrow(table).repartition(blocks), 128, 64, seed=0)
            digest = hashlib.sha256()
            for batch in packed.iter_batches(batch_format="pyarrow"):
                digest.update(batch.column("input_ids").combine_chunks().flatten().to_numpy().tobytes())
            digests.append((packed.count(), digest.hexdigest()))
    finally:
        context.execution_options.preserve_order = before
    assert digests[0] == digests[1] and digests[0][0] > 0
    # The order is a shuffle, not the documents' order: the first row is not the first documents' tokens.
    first = next(iter(packed.iter_rows()))["input_ids"]
    assert list(first[:5]) != list(docs[0][:5])
