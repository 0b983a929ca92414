"""The scale benchmarks' corpus generator: what it plants is what its truth says, and it is deterministic."""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import Counter, defaultdict

import pyarrow.parquet as pq
import pytest

from tests.planted_corpus import jaccard, shingles
from tests.scale_corpus import DOMAINS, ScaleCorpusSpec, dedup_score, read_truth, write_corpus

SPEC = ScaleCorpusSpec(documents=1500, seed=3, shard_documents=400, pool_blocks=4000)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(SPEC, tmp_path_factory.mktemp("scale") / "corpus", processes=2)


def _records(corpus, form: str) -> dict[str, dict]:
    records = {}
    for domain in DOMAINS:
        for path in sorted((corpus / form / domain).iterdir()):
            if form == "jsonl":
                with gzip.open(path, "rt", encoding="utf-8") as handle:
                    rows = [json.loads(line) for line in handle]
            else:
                rows = pq.read_table(path).to_pylist()
            records.update({row["id"]: row for row in rows})
    return records


def test_the_truth_matches_the_planted_documents(corpus):
    truth = read_truth(corpus)
    records = _records(corpus, "jsonl")
    assert len(records) == len(truth) == SPEC.documents
    assert records == _records(corpus, "parquet")
    roles = Counter(truth["role"])
    assert roles["exact"] == round(SPEC.documents * SPEC.exact_share)
    assert roles["near"] == round(SPEC.documents * SPEC.near_share)
    assert roles["negative"] == round(SPEC.documents * SPEC.negative_share)
    assert roles["junk"] == round(SPEC.documents * SPEC.junk_share)
    copies = truth[truth["role"].isin(["exact", "near", "negative"])]
    assert copies["base_id"].is_unique and set(truth.set_index("id").loc[copies["base_id"], "role"]) == {"unique"}
    for row in copies.itertuples():
        text, base = records[row.id]["text"], records[row.base_id]["text"]
        assert records[row.id]["domain"] == records[row.base_id]["domain"] == row.domain
        if row.role == "exact":
            assert text == base
            continue
        measured = jaccard(text, base)
        assert measured == pytest.approx(row.jaccard)
        low, high = SPEC.near_jaccard if row.role == "near" else SPEC.negative_jaccard
        assert low <= measured <= high, (row.id, measured)
    assert set(truth.loc[truth["role"] == "junk", "junk_kind"]) == {
        "symbol_soup",
        "boilerplate",
        "spam",
        "log_lines",
        "word_salad",
    }


def test_unplanted_documents_are_not_near_duplicates_of_each_other(corpus):
    """Only the planted pairs are duplicates: any two other documents share few word 5-grams."""
    truth = read_truth(corpus)
    records = _records(corpus, "jsonl")
    planted = set(truth.loc[truth["role"].isin(["exact", "near", "negative"]), "id"])
    others = [doc for doc in records if doc not in planted and truth.set_index("id").loc[doc, "role"] == "unique"]
    by_shingle: dict[tuple, list[int]] = defaultdict(list)
    sizes = []
    for index, doc in enumerate(others):
        grams = shingles(records[doc]["text"])
        sizes.append(len(grams))
        for gram in grams:
            by_shingle[gram].append(index)
    shared: Counter[tuple[int, int]] = Counter()
    for holders in by_shingle.values():
        if 1 < len(holders) < 50:  # a gram in many documents is a common line; it cannot make a pair similar
            for i, left in enumerate(holders):
                for right in holders[i + 1 :]:
                    shared[left, right] += 1
    worst = max(
        (count / (sizes[left] + sizes[right] - count) for (left, right), count in shared.items()),
        default=0.0,
    )
    assert worst < 0.5  # the planted negatives start at 0.4, the near copies at 0.8


def test_the_same_spec_writes_the_same_corpus(corpus, tmp_path):
    again = write_corpus(SPEC, tmp_path / "again", processes=1)

    def digest(root):
        files = sorted(p for p in (root / "jsonl").rglob("*.jsonl.gz"))
        return hashlib.sha256(b"".join(gzip.decompress(p.read_bytes()) for p in files)).hexdigest()

    assert digest(again) == digest(corpus)
    assert read_truth(again).equals(read_truth(corpus))


def test_dedup_score_counts_one_drop_per_planted_pair(corpus):
    truth = read_truth(corpus)
    pairs = truth[truth["role"].isin(["exact", "near"])]
    perfect = set(pairs["id"])
    assert dedup_score(perfect, truth).f1 == 1.0
    both = perfect | set(pairs["base_id"])  # dropping both documents of a pair is one hit and one false drop
    assert dedup_score(both, truth).precision == pytest.approx(0.5)
    negatives = truth[truth["role"] == "negative"]
    half = set(sorted(perfect)[: len(perfect) // 2])
    score = dedup_score(half | {negatives["id"].iloc[0], negatives["base_id"].iloc[1]}, truth)
    assert score.negatives_dropped == 2 and score.recall == pytest.approx(len(half) / len(perfect))
    assert score.precision == pytest.approx(len(half) / (len(half) + 2))
