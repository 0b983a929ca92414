"""datatrove's MinHash near-dedup pipeline on a JSONL corpus, for comparison with Loom's near-dedup.

Benchmark only: datatrove is not a dependency of Loom and never goes into the project venv (its
requirements could move pinned packages). This file has two parts:

* ``ensure_datatrove_venv(path)`` (stdlib only, importable from the project venv): a separate venv
  at ``path`` (e.g. ``bench-results/datatrove-venv``, ignored by git) holding ``datatrove==0.10.1``
  and the extras its MinHash steps need; returns that venv's python. Idempotent (a stamp file).
* ``__main__``, run with that python::

      python tests/benchmarks/datatrove_dedup.py --input DIR --workdir DIR --tasks 2 --workers 2 \
          --ngram 5 --buckets 16 --hashes-per-bucket 8 --out result.json

  reads every ``*.jsonl.gz`` under ``--input`` (recursively; lines ``{"id", "text", "domain"}``) with
  ``JsonlReader(id_key="id")``, runs datatrove's documented four stages (``MinhashDedupSignature`` ->
  ``MinhashDedupBuckets`` -> ``MinhashDedupCluster`` -> ``MinhashDedupFilter``, each a
  ``LocalPipelineExecutor``) and writes ``{"documents", "removed_ids", "seconds", "seconds_by_stage",
  "settings", "datatrove_version", "versions", "clusters", "removed_ids_smallest_kept"}`` (the last
  two are read back after the timed run; see ``duplicate_clusters``).

Extras installed beside datatrove (imported by the code used here, not in its core requirements):

* ``orjson``: ``JsonlReader`` / ``JsonlWriter`` (datatrove's ``io`` extra; the rest of that extra,
  datasets/pyarrow/warcio/..., is not needed here).
* ``xxhash<4``: ``HashConfig``'s default shingle hash (``hash_fc="xxhash"``), and ``regex``: imported by
  ``datatrove.utils.text`` (text normalisation) -- both from datatrove's ``processing`` extra, which
  also pulls nltk/fasttext/trafilatura/..., none of them used by the MinHash steps.
* ``tokenizers``: not used by MinHash, but ``datatrove.pipeline.dedup``'s ``__init__`` imports the
  exact-substring steps, which import it at module level (no model is loaded or downloaded).
* ``spacy``: only for ``--tokenizer spacy``, datatrove's default English word tokenizer
  (``SpaCyTokenizer("en")`` = ``spacy.blank("en")``: rule-based, no model or data download; nltk's
  punkt, which would need downloaded data, is not used by datatrove for English).

How datatrove builds shingles (``MinhashDedupSignature.get_shingles``, datatrove 0.10.1):

1. ``simplify_text`` with the default ``TextNormConfig``: lower-case; every run of digits (any
   script, optional decimal part) -> ``"0"``; punctuation (datatrove's fixed ``PUNCTUATION`` list plus
   control characters) -> space; whitespace runs -> one space, stripped; NFD and drop combining marks
   (diacritics). Weekday/month-name normalisation is off by default.
2. word tokenizer: here ``--tokenizer whitespace`` (default), a ``WordTokenizer`` subclass doing
   ``str.split()``, which is Loom's word boundary (Arrow whitespace split). datatrove's own
   English default is spaCy's rule-based tokenizer (``--tokenizer spacy``), which on punctuation-free
   text mostly splits on whitespace but also applies English exceptions ("cannot" -> "can not",
   "gonna" -> "gon na"); spaCy is also much slower per document than ``str.split``.
3. word n-grams (n = ``--ngram``) joined by a space, each hashed with xxhash64 (uint64).
4. MinHash: ``(a * h + b) mod (2^61 - 1)`` for ``buckets * hashes_per_bucket`` permutations, (a, b)
   from ``numpy.random.RandomState(seed)``; 64-bit signatures, split into ``buckets`` bands of
   ``hashes_per_bucket`` rows. Two documents are a candidate pair when all rows of one band are equal.
   No Jaccard verification of pairs. Pairs are union-found (stage 3); every cluster member except
   its root is removed (stage 4). The root is the bigger set's root at union time, not e.g. the
   lowest id, so *which* copy of a cluster survives can differ from Loom's.

Differences from Loom's ``MinHashDedup`` (``pipelines/data/minhash.py``), for an honest comparison:

* Loom only lower-cases and splits on whitespace: no number, punctuation or diacritic folding.
  On plain word text (like the planted corpora) the two shingle sets are the same; on web text
  datatrove's folding merges more documents.
* A document with fewer than n words: Loom makes one shingle of all its words; datatrove makes no
  shingle and writes no signature, so such a document is never a duplicate. The reader also skips
  documents with empty text (they are not counted in ``documents``).
* Loom hashes shingles to 32 bits and uses datasketch's affine32 permutations; datatrove uses 64-bit
  hashes and permutations mod 2^61 - 1 (fewer chance collisions, same estimator).
* Loom's recipe verifies candidate pairs' true Jaccard by default (``verify=True``); datatrove never
  does, so compare with Loom's ``verify=False`` for like-for-like LSH, or expect a few more
  false positives from datatrove.
* 16 bands x 8 rows = 128 permutations; the LSH threshold is about (1/16)^(1/8) = 0.71.

Stage parallelism (datatrove's example layout): stages 1 and 4 use ``--tasks`` tasks (whole input
files are sharded over the tasks, so tasks beyond the number of files idle, and stage 4 must use
stage 1's count); stage 2 one task per band
(``--buckets``); stage 3 a single task. ``--workers`` processes run at once in every stage. Stage 4
writes only the removed documents (the exclusion writer, to collect their ids) unless
``--write-kept`` also asks for the deduplicated corpus, like the datatrove example does.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATATROVE_VERSION = "0.10.1"
#: What the venv holds; the stamp records it, so a change here rebuilds the venv.
REQUIREMENTS = (f"datatrove=={DATATROVE_VERSION}", "orjson", "xxhash<4", "regex", "tokenizers", "spacy")
STAMP = ".loom-datatrove-stamp"
#: Subfolders of --workdir this script owns (cleared before each run: datatrove skips completed tasks).
WORK_SUBDIRS = ("signatures", "buckets", "remove_ids", "removed", "kept", "logs")


def ensure_datatrove_venv(path: Path, python: str | None = None) -> Path:
    """A venv at ``path`` with datatrove and its MinHash extras (``REQUIREMENTS``); returns its python.

    Idempotent: a stamp file written after a successful install names the requirements; when it
    matches, nothing is done. ``pip`` uses the ambient configuration (the local index)."""
    path = Path(path).absolute()
    venv_python = path / "bin" / "python"
    stamp = path / STAMP
    wanted = "\n".join(REQUIREMENTS) + "\n"
    if venv_python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return venv_python
    if path.exists() and any(path.iterdir()) and not (path / "pyvenv.cfg").exists():
        raise FileExistsError(f"{path} exists and is not a venv; not touching it")
    python = python or shutil.which("python3.11") or sys.executable
    subprocess.run([python, "-m", "venv", "--clear", str(path)], check=True)
    subprocess.run([str(venv_python), "-m", "pip", "install", "--quiet", *REQUIREMENTS], check=True)
    stamp.write_text(wanted)
    return venv_python


def _whitespace_tokenizer():
    """datatrove ``WordTokenizer`` splitting on whitespace (``str.split``), as Loom does.

    Defined in a function so this module imports without datatrove (from the project venv)."""
    from datatrove.utils.word_tokenizers import WordTokenizer

    class WhitespaceSplitTokenizer(WordTokenizer):
        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return [text.strip()] if text.strip() else []

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [(0, len(text))]

    return WhitespaceSplitTokenizer()


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("datatrove", "numpy", "orjson", "xxhash", "spacy"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def duplicate_clusters(dups_folder: Path, reader, tasks: int) -> list[list[str]]:
    """datatrove's duplicate clusters as sorted lists of document ids (sorted by first id), read back
    after the timed run from stage 2's ``.dups`` files, (stage-1 task, document index) pairs.

    datatrove keeps an arbitrary member of each cluster (its union-find root), Loom's planted-corpus
    scoring the smallest id: ``removed_ids_smallest_kept`` is datatrove's clusters with Loom's choice
    of survivor, for scoring against ``PlantedCorpus.expected_drops()``."""
    import struct

    parent: dict[tuple[int, int], tuple[int, int]] = {}

    def find(node):
        parent.setdefault(node, node)
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for file in sorted(dups_folder.glob("*.dups")):
        data = file.read_bytes()
        for f1, d1, f2, d2 in struct.iter_unpack("<4I", data):
            a, b = find((f1, d1)), find((f2, d2))
            if a != b:
                parent[max(a, b)] = min(a, b)
    # Document index -> id: the stage-1 index enumerates each task's reader output, so the same
    # reader (datatrove's own sharding) read again gives the ids.
    wanted: dict[int, set[int]] = {}
    for file_id, doc_index in parent:
        wanted.setdefault(file_id, set()).add(doc_index)
    ids: dict[tuple[int, int], str] = {}
    for rank in sorted(wanted):
        for doc_index, doc in enumerate(reader().run(rank=rank, world_size=tasks)):
            if doc_index in wanted[rank]:
                ids[(rank, doc_index)] = doc.id
    groups: dict[tuple[int, int], list[str]] = {}
    for node in parent:
        groups.setdefault(find(node), []).append(ids[node])
    return sorted(sorted(group) for group in groups.values())


def run(args: argparse.Namespace) -> dict:
    from dataclasses import asdict

    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers.jsonl import JsonlWriter
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.typeshelper import Languages

    work = Path(args.workdir).absolute()
    for name in WORK_SUBDIRS:
        shutil.rmtree(work / name, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)

    config = MinhashConfig(
        n_grams=args.ngram,
        num_buckets=args.buckets,
        hashes_per_bucket=args.hashes_per_bucket,
        seed=args.seed,
        hash_config=HashConfig(precision=64, hash_fc="xxhash"),
    )
    # A WordTokenizer instance is used as is by datatrove's load_word_tokenizer; "eng" -> spaCy.
    tokenizer = _whitespace_tokenizer() if args.tokenizer == "whitespace" else Languages.english

    def reader():
        # The same reader (and the same --tasks) in stages 1 and 4: file shards and the per-task
        # document indices written in stage 1 must line up in stage 4.
        return JsonlReader(str(Path(args.input).absolute()), glob_pattern="**/*.jsonl.gz", id_key="id")

    def executor(stage: str, pipeline: list, tasks: int):
        return LocalPipelineExecutor(
            pipeline=pipeline,
            tasks=tasks,
            workers=min(args.workers, tasks),
            logging_dir=str(work / "logs" / stage),
            skip_completed=False,
        )

    stage4 = [
        reader(),
        MinhashDedupFilter(
            input_folder=str(work / "remove_ids"),
            exclusion_writer=JsonlWriter(str(work / "removed"), compression=None),
        ),
    ]
    if args.write_kept:
        stage4.append(JsonlWriter(str(work / "kept")))
    stages = {
        "signatures": executor(
            "signatures",
            [
                reader(),
                MinhashDedupSignature(output_folder=str(work / "signatures"), config=config, language=tokenizer),
            ],
            args.tasks,
        ),
        "buckets": executor(
            "buckets",
            [
                MinhashDedupBuckets(
                    input_folder=str(work / "signatures"), output_folder=str(work / "buckets"), config=config
                )
            ],
            args.buckets,
        ),
        "cluster": executor(
            "cluster",
            [
                MinhashDedupCluster(
                    input_folder=str(work / "buckets"), output_folder=str(work / "remove_ids"), config=config
                )
            ],
            1,
        ),
        "filter": executor("filter", stage4, args.tasks),
    }

    seconds_by_stage, stats = {}, None
    started = time.perf_counter()
    for name, stage in stages.items():
        stage_start = time.perf_counter()
        stats = stage.run()
        seconds_by_stage[name] = round(time.perf_counter() - stage_start, 3)
    seconds = time.perf_counter() - started

    # Stage 4's merged stats: [reader, filter, (writer)]; the filter counts every document it saw.
    filter_stats = stats.stats[1]
    documents, dropped = int(filter_stats["total"].total), int(filter_stats["dropped"].total)
    removed_ids = []
    for file in sorted((work / "removed").glob("*.jsonl")):
        with file.open() as lines:
            removed_ids.extend(json.loads(line)["id"] for line in lines)
    if len(removed_ids) != dropped or len(set(removed_ids)) != len(removed_ids):
        raise RuntimeError(
            f"{dropped} documents dropped, {len(removed_ids)} ids excluded ({len(set(removed_ids))} distinct)"
        )

    clusters = duplicate_clusters(work / "buckets", reader, args.tasks)
    if sum(len(cluster) - 1 for cluster in clusters) != len(removed_ids) or not set(removed_ids) <= {
        doc for cluster in clusters for doc in cluster
    }:
        raise RuntimeError("the clusters read back from the .dups files do not match the removed documents")

    return {
        "documents": documents,
        "removed_ids": sorted(removed_ids),
        "clusters": clusters,
        "removed_ids_smallest_kept": sorted(doc for cluster in clusters for doc in cluster[1:]),
        "seconds": round(seconds, 3),
        "seconds_by_stage": seconds_by_stage,
        "settings": {
            "n_grams": config.n_grams,
            "num_buckets": config.num_buckets,
            "hashes_per_bucket": config.hashes_per_bucket,
            "num_perm": config.num_buckets * config.hashes_per_bucket,
            "lsh_threshold_approx": round((1 / config.num_buckets) ** (1 / config.hashes_per_bucket), 4),
            "seed": config.seed,
            "hash_config": {"precision": config.hash_config.precision, "hash_fc": config.hash_config.hash_fc},
            "norm_config": asdict(config.norm_config),
            "tokenizer": args.tokenizer,
            "tasks_by_stage": {"signatures": args.tasks, "buckets": args.buckets, "cluster": 1, "filter": args.tasks},
            "workers": args.workers,
            "write_kept": args.write_kept,
        },
        "datatrove_version": _versions().get("datatrove"),
        "versions": _versions(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="folder of *.jsonl.gz files (searched recursively)")
    parser.add_argument("--workdir", required=True, help="datatrove's intermediate files and logs")
    parser.add_argument("--tasks", type=int, default=2, help="tasks of stages 1 and 4 (files are sharded over them)")
    parser.add_argument("--workers", type=int, default=2, help="processes at once in each stage")
    parser.add_argument("--ngram", type=int, default=5)
    parser.add_argument("--buckets", type=int, default=16, help="LSH bands")
    parser.add_argument("--hashes-per-bucket", type=int, default=8, help="LSH rows per band")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tokenizer", choices=("whitespace", "spacy"), default="whitespace")
    parser.add_argument("--write-kept", action="store_true", help="also write the kept documents (gzip JSONL)")
    parser.add_argument("--out", required=True, help="result JSON")
    args = parser.parse_args(argv)
    # Nothing may reach the network at run time (datatrove imports huggingface_hub).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"datatrove {result['datatrove_version']}: {result['documents']} documents, "
        f"{len(result['removed_ids'])} removed, {result['seconds']:.2f} s "
        f"({result['documents'] / max(result['seconds'], 1e-9):.0f} docs/s) {result['seconds_by_stage']}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
