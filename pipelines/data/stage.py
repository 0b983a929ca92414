"""The data stage: raw text -> curated, deduplicated, tokenized, packed parquet shards.

Outputs under ``<run>/data/``: ``train/`` and ``val/`` parquet shards (column
``input_ids``, ``seq_len`` int32 ids), ``tokenizer/``, ``rejects/`` (every dropped
row with its reason) and ``stats.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

from pipelines.data.config import DataConfig
from pipelines.data.pack import Tokenize, pack
from pipelines.data.readers import read_documents, stdlib_files
from pipelines.data.steps import ExactDedup, MinLengthFilter, Normalize, Step
from pipelines.runs import RunDir, StageResult, hash_files

log = logging.getLogger(__name__)


def curation_steps(config: DataConfig) -> list[Step]:
    """Steps before deduplication, in order."""
    return [Normalize(), MinLengthFilter(config.min_document_chars)]


def _split_rejects(ds):
    """(kept, rejected) by ``reject_reason``; materialised once so both halves reuse it."""
    from ray.data.expressions import col

    ds = ds.materialize()
    return ds.filter(expr=col("reject_reason").is_null()), ds.filter(expr=col("reject_reason").is_not_null())


def _drops_by_step(rejected) -> dict[str, int]:
    """Count rejects by the step that dropped them (reasons read "step: detail")."""
    counts: Counter[str] = Counter()
    for batch in rejected.select_columns(["reject_reason"]).iter_batches(batch_format="pyarrow"):
        counts.update(reason.split(":", 1)[0] for reason in batch.column("reject_reason").to_pylist())
    return dict(sorted(counts.items()))


def dedup_partitions(documents: int) -> int:
    """Hash partitions for the dedup shuffle: about 50k documents each, at least 2."""
    return max(2, min(1024, documents // 50_000))


def input_hash(config: DataConfig) -> str:
    """Content hash of local inputs (the stdlib files read); remote sources are hashed by path."""
    files: list[Path] = []
    for spec in config.sources:
        if spec.format == "stdlib":
            chosen = stdlib_files()
            files += [Path(p) for p in (chosen[: config.max_documents] if config.max_documents else chosen)]
        elif spec.path and Path(spec.path).exists():
            root = Path(spec.path)
            files += [p for p in root.rglob("*") if p.is_file()] if root.is_dir() else [root]
    return hash_files(files)


def run_data(config: DataConfig, run: RunDir, seed: int) -> StageResult:
    import ray.data

    # Deterministic output for the same input and seed (limits, shuffles and splits see rows in order).
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    out = run.begin("data")
    for name in ("train", "val", "rejects", "tokenizer"):
        shutil.rmtree(out / name, ignore_errors=True)  # half-written outputs of an earlier attempt

    raw = read_documents(config).materialize()
    documents_in = raw.count()
    ds = raw
    for step in curation_steps(config):
        ds = step.apply(ds)
    kept, rejected = _split_rejects(ds)
    kept, duplicates = _split_rejects(ExactDedup(dedup_partitions(documents_in)).apply(kept))
    rejects = rejected.union(duplicates.drop_columns(["content_hash"]))
    rejects.write_parquet(str(out / "rejects"))
    kept = kept.drop_columns(["content_hash"]).materialize()
    documents_out = kept.count()
    log.info("data: %d documents in, %d kept", documents_in, documents_out)

    tokenizer_dir = out / "tokenizer"
    if config.tokenizer_path:
        shutil.copytree(config.tokenizer_path, tokenizer_dir)
    else:
        from pipelines.model.tokenizer import iter_texts, train_bpe

        train_bpe(
            iter_texts(kept.select_columns(["text"]).iter_batches(batch_size=256)), config.vocab_size, tokenizer_dir
        )

    tokenized = kept.map_batches(
        Tokenize,
        fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir)},
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=config.tokenize_actors),
    ).materialize()
    tokens_per_source = {
        row["source"]: int(row["sum(num_tokens)"])
        for row in tokenized.groupby("source", num_partitions=1).sum("num_tokens").take_all()
    }
    packed = tokenized.map_batches(
        pack, fn_kwargs={"seq_len": config.seq_len}, batch_size=config.batch_size, batch_format="pyarrow"
    ).random_shuffle(seed=seed)
    if config.val_fraction > 0:
        train, val = packed.split_proportionately([1.0 - config.val_fraction])
    else:
        train, val = packed.materialize(), None
    # Both halves are materialised by the split: counting them is cheap, and done once.
    sequences = {"train": train.count(), "val": val.count() if val is not None else 0}
    if sequences["train"] == 0:
        raise RuntimeError(
            f"data: no training sequence of {config.seq_len} tokens could be packed from "
            f"{documents_out} documents; add text or lower data.seq_len"
        )
    train.write_parquet(str(out / "train"), min_rows_per_file=config.rows_per_shard)
    if sequences["val"]:
        val.write_parquet(str(out / "val"), min_rows_per_file=config.rows_per_shard)

    tokens_in = sum(tokens_per_source.values())
    packed_tokens = (sequences["train"] + sequences["val"]) * config.seq_len
    stats = {
        "documents_in": documents_in,
        "documents_out": documents_out,
        "drops_by_step": _drops_by_step(rejects),
        "documents_rejected": documents_in - documents_out,
        "tokens": tokens_in,
        "tokens_by_source": tokens_per_source,
        "tokens_packed": packed_tokens,
        "tokens_dropped_at_pack_tail": tokens_in - packed_tokens,
        "sequences": sequences,
        "seq_len": config.seq_len,
    }
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return StageResult(
        inputs={"sources": input_hash(config)},
        outputs={
            "train": str(out / "train"),
            "val": str(out / "val") if sequences["val"] else "",
            "tokenizer": str(tokenizer_dir),
            "rejects": str(out / "rejects"),
            "stats": str(out / "stats.json"),
        },
        metrics={k: stats[k] for k in ("documents_in", "documents_out", "tokens", "tokens_packed", "sequences")},
    )
