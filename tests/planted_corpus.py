"""A synthetic corpus with planted near-duplicates of known Jaccard similarity (tests and benchmarks).

Documents are random word sequences; a near-duplicate is a copy of a base document
with a few words replaced, so its word 5-gram Jaccard similarity to the base is
high (about 0.95); a "hard negative" has many words replaced (similarity about
0.5 or less). The true similarity of every planted pair is computed, not assumed.
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

    def expected_drops(self) -> set[str]:
        """Every planted cluster member except the survivor, the smallest doc_id."""
        return {doc for cluster in self.clusters for doc in sorted(cluster)[1:]}


def _doc_id(rng: random.Random) -> str:
    return hashlib.sha1(str(rng.random()).encode()).hexdigest()[:16]


def planted_corpus(
    bases: int, variants_per_base: int = 2, hard_negatives: int = 0, uniques: int = 0, words: int = 200, seed: int = 0
) -> PlantedCorpus:
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(5000)]

    def text(length: int) -> list[str]:
        return rng.choices(vocabulary, k=length)

    def edited(base: list[str], edits: int) -> list[str]:
        copy = list(base)
        for position in rng.sample(range(len(copy)), edits):
            copy[position] = rng.choice(vocabulary)
        return copy

    corpus = PlantedCorpus()
    for _ in range(bases):
        base = text(words)
        base_id = _doc_id(rng)
        cluster = [base_id]
        corpus.documents.append((base_id, " ".join(base)))
        for _ in range(variants_per_base):
            variant = " ".join(edited(base, max(1, words // 200)))
            corpus.min_positive_jaccard = min(corpus.min_positive_jaccard, jaccard(" ".join(base), variant))
            cluster.append(_doc_id(rng))
            corpus.documents.append((cluster[-1], variant))
        corpus.clusters.append(cluster)
    for index in range(hard_negatives):
        base_text = corpus.documents[(index % max(1, bases)) * (variants_per_base + 1)][1]
        negative = " ".join(edited(base_text.split(), words // 8))
        corpus.max_negative_jaccard = max(corpus.max_negative_jaccard, jaccard(base_text, negative))
        corpus.hard_negatives.append(_doc_id(rng))
        corpus.documents.append((corpus.hard_negatives[-1], negative))
    for _ in range(uniques):
        corpus.documents.append((_doc_id(rng), " ".join(text(words))))
    rng.shuffle(corpus.documents)
    return corpus
