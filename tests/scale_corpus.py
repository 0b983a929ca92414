"""A corpus of any size for the data stage's scale benchmarks, with its planted truth written beside it.

Text already on the machine, nothing downloaded: the installed packages' Python sources (domain
``code``: blank-line separated blocks of source) and the prose paragraphs of their docstrings
(domain ``prose``). A unique document is blocks of one domain drawn at random until it reaches a
length drawn in ``doc_chars``; blocks recur across documents, but two unique documents share
almost no word 5-gram (a shared block is a small part of each). Planted into that:

- ``exact``: an identical copy of a unique document (another id);
- ``near``: a copy with words replaced until its true word 5-gram Jaccard (lower-cased,
  whitespace-split words, as Loom's near-dedup reads them) to its base lies in ``near_jaccard``;
- ``negative``: the same, with a Jaccard in ``negative_jaccard`` (below the dedup threshold:
  not a duplicate);
- ``junk``: the quality corpus's generated junk (symbol soup, boilerplate, spam, log lines,
  word salad).

Every copy has its own base (no base is copied twice), so each planted duplicate is a cluster
of two. The true Jaccard of every near copy and negative is computed, not assumed.

Deterministic by seed for one environment (the block pool is read from the packages installed
in the running interpreter, in path order). Each document is made from ``(seed, index)`` alone,
so shards are generated independently, in parallel. Written under one directory:
``jsonl/<domain>/shard-NNNNN.jsonl.gz`` and ``parquet/<domain>/shard-NNNNN.parquet`` (records
``{"id", "text", "domain"}``), ``truth.parquet`` (id, domain, role, base_id, jaccard,
junk_kind) and ``spec.json``. ``python -m tests.scale_corpus --documents N OUT`` writes one.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from tests.planted_corpus import shingles
from tests.quality_corpus import JUNK_KINDS, docstring_prose, junk_document

#: Bumped whenever the same spec would give other documents (cached corpora are keyed by it).
GENERATOR_VERSION = 1
DOMAINS = ("code", "prose")
ROLES = ("unique", "exact", "near", "negative", "junk")
NGRAM = 5
#: Enough 5-grams that one replaced word moves the Jaccard by under 0.07: copies land in narrow ranges.
MIN_WORDS = 150
MAX_BLOCK_CHARS = 500
_WORD_SPAN = re.compile(r"\S+")


@dataclass(frozen=True)
class ScaleCorpusSpec:
    documents: int
    seed: int = 0
    #: Share of all documents that are each planted kind (the rest are unique documents).
    exact_share: float = 0.03
    near_share: float = 0.05
    negative_share: float = 0.02
    junk_share: float = 0.03
    code_share: float = 0.6  # of the unique documents (copies take their base's domain)
    near_jaccard: tuple[float, float] = (0.8, 0.95)
    negative_jaccard: tuple[float, float] = (0.4, 0.5)
    doc_chars: tuple[int, int] = (1500, 4000)
    shard_documents: int = 20_000
    pool_blocks: int = 200_000  # distinct blocks read per domain (fewer: faster to start, more reuse)

    def __post_init__(self):
        planted = self.exact_share + self.near_share + self.negative_share
        problems = []
        if self.documents < 1:
            problems.append(f"documents must be at least 1, got {self.documents}")
        if planted * 2 + self.junk_share > 1:
            problems.append(f"planted copies ({planted:.2f}) need as many unique bases; with junk that is over 1")
        if not 0 <= self.code_share <= 1:
            problems.append(f"code_share must be in [0, 1], got {self.code_share}")
        if problems:
            raise ValueError("scale corpus: " + "; ".join(problems))

    def key(self) -> str:
        fields = dataclasses.asdict(self) | {"generator": GENERATOR_VERSION}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def shards(self) -> int:
        return -(-self.documents // self.shard_documents)


@dataclass(frozen=True)
class Plan:
    """Who each document is: a role, a domain and (for copies) its base's index; arrays by index."""

    role: np.ndarray  # int8 index into ROLES
    domain: np.ndarray  # int8 index into DOMAINS
    base: np.ndarray  # int64, -1 where the document is not a copy


def plan(spec: ScaleCorpusSpec) -> Plan:
    rng = np.random.default_rng(spec.seed)
    n = spec.documents
    counts = {
        "exact": round(n * spec.exact_share),
        "near": round(n * spec.near_share),
        "negative": round(n * spec.negative_share),
        "junk": round(n * spec.junk_share),
    }
    role = np.zeros(n, dtype=np.int8)
    order = rng.permutation(n)
    start = 0
    for name, count in counts.items():
        role[order[start : start + count]] = ROLES.index(name)
        start += count
    domain = (rng.random(n) >= spec.code_share).astype(np.int8)  # 0 code, 1 prose
    base = np.full(n, -1, dtype=np.int64)
    copies = np.flatnonzero(np.isin(role, [ROLES.index("exact"), ROLES.index("near"), ROLES.index("negative")]))
    uniques = np.flatnonzero(role == 0)
    base[copies] = rng.choice(uniques, size=len(copies), replace=False)
    domain[copies] = domain[base[copies]]
    return Plan(role=role, domain=domain, base=base)


def doc_id(spec: ScaleCorpusSpec, index: int) -> str:
    return f"s{spec.seed}-{index:09d}"


@lru_cache(maxsize=4)
def block_pool(domain: str, limit: int = 200_000) -> tuple[str, ...]:
    """Distinct blocks of ``domain`` text from the installed packages' ``.py`` files, in path order."""
    roots = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"]})
    seen: set[int] = set()
    pool: list[str] = []
    for root in roots:
        for directory, subdirectories, files in os.walk(root):
            subdirectories.sort()
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                try:
                    source = Path(directory, name).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                if domain == "prose":
                    blocks = [piece for text in docstring_prose(source) for piece in _bounded(text, ". ")]
                else:
                    blocks = _code_blocks(source)
                for block in blocks:
                    digest = hash(block)
                    if digest not in seen:
                        seen.add(digest)
                        pool.append(block)
                if len(pool) >= limit:
                    return tuple(pool)
    if not pool:
        raise RuntimeError(f"scale corpus: no {domain} text found under {roots}")
    return tuple(pool)


def _code_blocks(source: str) -> list[str]:
    """Blank-line separated runs of source with some substance (not a lone import or brace)."""
    return [
        chunk
        for block in re.split(r"\n\s*\n", source)
        if len(block.split()) >= 8
        for chunk in _bounded(block.strip("\n"), "\n")
        if len(chunk) >= 80
    ]


def _bounded(block: str, separator: str) -> list[str]:
    """``block`` cut at ``separator`` into pieces of at most MAX_BLOCK_CHARS: no block is a large part of
    a document, so two documents that happen to draw the same block stay far apart (Jaccard < 0.5)."""
    if len(block) <= MAX_BLOCK_CHARS:
        return [block]
    pieces, current = [], ""
    for part in block.split(separator):
        if current and len(current) + len(part) + len(separator) > MAX_BLOCK_CHARS:
            pieces.append(current)
            current = ""
        current = f"{current}{separator}{part}" if current else part
    # A single line or sentence longer than the bound is left out (a data table, a long URL list).
    return [piece for piece in [*pieces, current] if piece and len(piece) <= MAX_BLOCK_CHARS]


def unique_text(spec: ScaleCorpusSpec, index: int, domain: str) -> str:
    rng = random.Random(f"{spec.seed}/{index}")
    pool = block_pool(domain, spec.pool_blocks)
    target = rng.randint(*spec.doc_chars)
    parts, length, words = [], 0, 0
    while length < target or words < MIN_WORDS:
        block = pool[rng.randrange(len(pool))]
        parts.append(block)
        length, words = length + len(block) + 2, words + len(block.split())
    return "\n\n".join(parts)


def edited_copy(
    base: str, low: float, high: float, rng: random.Random, vocabulary: tuple[str, ...]
) -> tuple[str, float]:
    """``base`` with whole words replaced (layout kept) until its true word 5-gram Jaccard to ``base``
    lies in [low, high]; returns (copy, Jaccard). Edits are aimed by the rule that a lone replaced
    word breaks ``NGRAM`` shingles, then the true value is computed and the count corrected."""
    spans = [match.span() for match in _WORD_SPAN.finditer(base)]
    base_shingles = shingles(base, NGRAM)
    total = len(base_shingles)
    target = rng.uniform(low, high)
    edits = max(1, round(total * (1 - target) / (NGRAM * (1 + target))))
    positions = list(range(len(spans)))
    rng.shuffle(positions)
    for _ in range(40):
        chosen = sorted(positions[: min(edits, len(positions))])
        pieces, last = [], 0
        for position in chosen:
            start, end = spans[position]
            pieces += [base[last:start], rng.choice(vocabulary)]
            last = end
        copy = "".join(pieces) + base[last:]
        copied = shingles(copy, NGRAM)
        similarity = len(base_shingles & copied) / len(base_shingles | copied)
        if low <= similarity <= high:
            return copy, similarity
        step = max(1, edits // 10)
        edits = edits + step if similarity > high else max(1, edits - step)
    raise ValueError(f"scale corpus: could not plant a copy in [{low}, {high}] ({len(spans)} words)")


@lru_cache(maxsize=4)
def _vocabulary(domain: str, pool_blocks: int) -> tuple[str, ...]:
    words = sorted({word for block in block_pool(domain, pool_blocks)[:5000] for word in block.split()})
    return tuple(words)


def document(spec: ScaleCorpusSpec, layout: Plan, index: int) -> dict:
    """One document's record and its truth row, made from (seed, index) and the plan alone."""
    role, domain = ROLES[layout.role[index]], DOMAINS[layout.domain[index]]
    rng = random.Random(f"{spec.seed}/{index}/copy")
    truth = {"id": doc_id(spec, index), "domain": domain, "role": role, "base_id": None, "jaccard": None}
    truth["junk_kind"] = None
    if role == "unique":
        text = unique_text(spec, index, domain)
    elif role == "junk":
        kind = JUNK_KINDS[index % len(JUNK_KINDS)]
        text = junk_document(rng, kind, block_pool("prose", spec.pool_blocks))
        truth["junk_kind"] = kind
    else:
        base_index = int(layout.base[index])
        base = unique_text(spec, base_index, domain)
        truth["base_id"] = doc_id(spec, base_index)
        if role == "exact":
            text, truth["jaccard"] = base, 1.0
        else:
            bounds = spec.near_jaccard if role == "near" else spec.negative_jaccard
            text, truth["jaccard"] = edited_copy(base, *bounds, rng, _vocabulary(domain, spec.pool_blocks))
    return {"record": {"id": truth["id"], "text": text, "domain": domain}, "truth": truth}


def _write_shard(args: tuple[ScaleCorpusSpec, Plan, int, Path]) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    spec, layout, shard, out = args
    made = [
        document(spec, layout, i)
        for i in range(shard * spec.shard_documents, min(spec.documents, (shard + 1) * spec.shard_documents))
    ]
    for domain in DOMAINS:
        records = [d["record"] for d in made if d["record"]["domain"] == domain]
        if not records:
            continue
        jsonl = out / "jsonl" / domain / f"shard-{shard:05d}.jsonl.gz"
        with gzip.open(jsonl, "wt", encoding="utf-8", compresslevel=1) as handle:
            handle.writelines(json.dumps(record) + "\n" for record in records)
        pq.write_table(pa.Table.from_pylist(records), out / "parquet" / domain / f"shard-{shard:05d}.parquet")
    return [d["truth"] for d in made]


def write_corpus(spec: ScaleCorpusSpec, out: Path, processes: int | None = None) -> Path:
    """Generate the corpus into ``out`` (replaced), shards in parallel; ``spec.json`` is written last."""
    import multiprocessing

    import pyarrow as pa
    import pyarrow.parquet as pq

    shutil.rmtree(out, ignore_errors=True)
    for form in ("jsonl", "parquet"):
        for domain in DOMAINS:
            (out / form / domain).mkdir(parents=True)
    layout = plan(spec)
    for domain in DOMAINS:  # read once here; the forked workers inherit the pools
        block_pool(domain, spec.pool_blocks)
        _vocabulary(domain, spec.pool_blocks)
    jobs = [(spec, layout, shard, out) for shard in range(spec.shards)]
    processes = processes or min(len(jobs), os.cpu_count() or 1)
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            truths = pool.map(_write_shard, jobs, chunksize=1)
    else:
        truths = [_write_shard(job) for job in jobs]
    pq.write_table(pa.Table.from_pylist([row for shard in truths for row in shard]), out / "truth.parquet")
    (out / "spec.json").write_text(json.dumps(dataclasses.asdict(spec) | {"key": spec.key()}, indent=2) + "\n")
    return out


def ensure_corpus(spec: ScaleCorpusSpec, cache: Path) -> Path:
    """The corpus for ``spec`` under ``cache``, generated once (a complete one has its spec.json)."""
    out = cache / f"corpus-{spec.documents}-{spec.key()}"
    if not (out / "spec.json").is_file():
        write_corpus(spec, out)
    return out


# --- the truth, and scores against it ---------------------------------------------------------------


def read_truth(corpus: Path):
    import pyarrow.parquet as pq

    return pq.read_table(corpus / "truth.parquet").to_pandas()


@dataclass(frozen=True)
class DedupScore:
    precision: float
    recall: float
    f1: float
    #: Hard-negative pairs (below the threshold) of which either document was dropped.
    negatives_dropped: int


def dedup_score(dropped: set[str], truth, roles: tuple[str, ...] = ("exact", "near")) -> DedupScore:
    """Dropped ids scored against the planted pairs of ``roles``: in each pair one document should go
    (which one is the dedup's choice); a drop outside every pair is a false positive."""
    pairs = truth[truth["role"].isin(list(roles))]
    in_pair = {}
    for copy, base in zip(pairs["id"], pairs["base_id"], strict=True):
        in_pair[copy] = in_pair[base] = copy
    dropped_per_pair: dict[str, int] = {}
    for doc in dropped:
        if doc in in_pair:
            dropped_per_pair[in_pair[doc]] = dropped_per_pair.get(in_pair[doc], 0) + 1
    true_positives = sum(min(1, count) for count in dropped_per_pair.values())
    precision = true_positives / len(dropped) if dropped else 1.0
    recall = true_positives / len(pairs) if len(pairs) else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    negatives = truth[truth["role"] == "negative"]
    merged = sum(
        copy in dropped or base in dropped for copy, base in zip(negatives["id"], negatives["base_id"], strict=True)
    )
    return DedupScore(precision, recall, f1, merged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--documents", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = write_corpus(ScaleCorpusSpec(documents=args.documents, seed=args.seed), args.out)
    print(f"wrote {args.documents:,} documents to {out}")


if __name__ == "__main__":
    main()
