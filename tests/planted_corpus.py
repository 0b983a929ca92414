"""A synthetic corpus with planted near-duplicates of known Jaccard similarity (tests and benchmarks).

Documents are random word sequences; a near-duplicate is a copy of a base document
with a few words replaced, so its word 5-gram Jaccard similarity to the base is
high (about 0.95 by default); a "hard negative" has many words replaced (similarity
about 0.5 or less). The true similarity of every planted pair is computed, not assumed.

``positive_jaccard=(low, high)`` plants near-duplicates whose true similarity to their
base is spread over that range instead (each copy draws a target in it and takes
single-word edits until its computed similarity reaches the target, never below
``low``): near-duplicates *at* a dedup threshold, where LSH bands miss the most.
``negative_jaccard=(low, high)`` does the same for hard negatives (e.g. (0.4, 0.5)).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

SYLLABLES = ["ka", "lo", "mi", "ra", "ten", "su", "vo", "de", "pa", "rin", "ol", "ze", "an", "tu", "bel", "ko"]


def shingles(text: str, ngram: int = 5) -> set[tuple[str, ...]]:
    words = text.lower().split()
    if len(words) < ngram:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + ngram]) for i in range(len(words) - ngram + 1)}


def jaccard(left: str, right: str, ngram: int = 5) -> float:
    a, b = shingles(left, ngram), shingles(right, ngram)
    return len(a & b) / len(a | b) if a | b else 1.0


@dataclass
class PlantedCorpus:
    documents: list[tuple[str, str]] = field(default_factory=list)  # (doc_id, text)
    clusters: list[list[str]] = field(default_factory=list)  # planted duplicate clusters, doc ids
    hard_negatives: list[str] = field(default_factory=list)
    min_positive_jaccard: float = 1.0
    max_negative_jaccard: float = 0.0
    #: Computed word 5-gram Jaccard of every planted near-duplicate (doc id) to its base, and of every hard negative.
    positive_jaccards: dict[str, float] = field(default_factory=dict)
    negative_jaccards: dict[str, float] = field(default_factory=dict)

    def expected_drops(self) -> set[str]:
        """Every planted cluster member except the survivor, the smallest doc_id."""
        return {doc for cluster in self.clusters for doc in sorted(cluster)[1:]}


def _doc_id(rng: random.Random) -> str:
    return hashlib.sha1(str(rng.random()).encode()).hexdigest()[:16]


def planted_corpus(
    bases: int,
    variants_per_base: int = 2,
    hard_negatives: int = 0,
    uniques: int = 0,
    words: int = 200,
    seed: int = 0,
    positive_jaccard: tuple[float, float] | None = None,
    negative_jaccard: tuple[float, float] | None = None,
) -> PlantedCorpus:
    """``bases`` clusters of a base and ``variants_per_base`` near-copies, ``hard_negatives`` heavy edits
    of the bases (not duplicates), ``uniques`` unrelated documents; shuffled, deterministic by ``seed``.
    Without ``positive_jaccard`` / ``negative_jaccard`` the edit counts are fixed (the original corpus)."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(5000)]

    def text(length: int) -> list[str]:
        return rng.choices(vocabulary, k=length)

    def edited(base: list[str], edits: int) -> list[str]:
        copy = list(base)
        for position in rng.sample(range(len(copy)), edits):
            copy[position] = rng.choice(vocabulary)
        return copy

    def edited_to(base: list[str], low: float, high: float) -> tuple[list[str], float]:
        """A copy of ``base`` with single words replaced until its true Jaccard reaches a target drawn in
        [low, high]; an edit that would take it below ``low`` is not made (another is tried). Half the
        edits go next to an earlier one, where they break one more shingle instead of ``ngram``, so the
        similarities spread over the range instead of bunching at multiples of one edit."""
        target, base_shingles = rng.uniform(low, high), shingles(" ".join(base))
        copy, similarity, changed = list(base), 1.0, []
        for _ in range(words * 4):
            if similarity <= target:
                break
            position = rng.randrange(len(copy))
            if changed and rng.random() < 0.5:
                position = min(len(copy) - 1, max(0, rng.choice(changed) + rng.choice((-1, 1))))
            trial = list(copy)
            trial[position] = rng.choice(vocabulary)
            trial_shingles = shingles(" ".join(trial))
            trial_similarity = len(base_shingles & trial_shingles) / len(base_shingles | trial_shingles)
            if trial_similarity >= low:
                copy, similarity = trial, trial_similarity
                changed.append(position)
        if similarity > high:
            raise ValueError(f"could not plant a copy in [{low}, {high}] with {words} words")
        return copy, similarity

    corpus = PlantedCorpus()
    for _ in range(bases):
        base = text(words)
        base_id = _doc_id(rng)
        cluster = [base_id]
        corpus.documents.append((base_id, " ".join(base)))
        for _ in range(variants_per_base):
            if positive_jaccard is None:
                variant = " ".join(edited(base, max(1, words // 200)))
                similarity = jaccard(" ".join(base), variant)
            else:
                copy, similarity = edited_to(base, *positive_jaccard)
                variant = " ".join(copy)
            corpus.min_positive_jaccard = min(corpus.min_positive_jaccard, similarity)
            cluster.append(_doc_id(rng))
            corpus.positive_jaccards[cluster[-1]] = similarity
            corpus.documents.append((cluster[-1], variant))
        corpus.clusters.append(cluster)
    for index in range(hard_negatives):
        base_text = corpus.documents[(index % max(1, bases)) * (variants_per_base + 1)][1]
        if negative_jaccard is None:
            negative = " ".join(edited(base_text.split(), words // 8))
            similarity = jaccard(base_text, negative)
        else:
            copy, similarity = edited_to(base_text.split(), *negative_jaccard)
            negative = " ".join(copy)
        corpus.max_negative_jaccard = max(corpus.max_negative_jaccard, similarity)
        corpus.hard_negatives.append(_doc_id(rng))
        corpus.negative_jaccards[corpus.hard_negatives[-1]] = similarity
        corpus.documents.append((corpus.hard_negatives[-1], negative))
    for _ in range(uniques):
        corpus.documents.append((_doc_id(rng), " ".join(text(words))))
    rng.shuffle(corpus.documents)
    return corpus
