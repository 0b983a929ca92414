"""The data stage: raw text -> curated, deduplicated, tokenized, packed parquet shards.

Outputs under ``<run>/data/``: ``train/`` and ``val/`` parquet shards (column
``input_ids``, ``seq_len`` int32 ids), ``tokenizer/``, ``rejects/`` (every dropped
row with its reason) and ``stats.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from pipelines.artifacts import DataOutputs
from pipelines.data.config import DataConfig
from pipelines.data.heldout import hold_out, write_heldout
from pipelines.data.metrics import export_gauges
from pipelines.data.pack import Tokenize, keep_until_cutoff, mix_cutoffs, mix_token_targets, packed_in_order
from pipelines.data.perplexity import plot_histogram
from pipelines.data.readers import SOURCES_CACHE, read_documents, source_fingerprint
from pipelines.data.steps import reason_key, split_kept
from pipelines.data.utils import shuffled_by
from pipelines.datasets import blocks_by_size, read_parquet
from pipelines.progress import PartsProgress
from pipelines.runs import MARKER, RunDir, StageResult

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _timed(part: str) -> Iterator[None]:
    """Logs how long a part of the stage took: the log shows where a long run's time went."""
    start = time.perf_counter()
    yield
    log.info("data: %s took %.1f s", part, time.perf_counter() - start)


STEPS_DIR = "steps"
#: Under the storage root: each part's seconds in the last data stage there, which weigh the progress line.
PROGRESS_PROFILE = Path(".loom") / "data-progress.json"


def _step_key(previous: str, step_config: dict) -> str:
    """Chained hash: a step's cached output is valid only for the same config of it and every step before."""
    return hashlib.sha256((previous + json.dumps(step_config, sort_keys=True)).encode()).hexdigest()[:16]


def _cached(directory: Path, key: str, produce):
    """The dataset materialised in ``directory`` if it was completed under ``key``; else produce, write, mark.

    Returns (dataset, produced) so the caller knows whether the step ran.
    """
    marker = directory / MARKER
    if marker.is_file() and marker.read_text().strip() == key:
        return _read_step(directory), False
    shutil.rmtree(directory, ignore_errors=True)
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    produce().write_parquet(str(partial))
    partial.rename(directory)
    return _read_step(directory), True


def _read_step(directory: Path):
    """A materialised step's rows, in as many blocks as their size warrants (pipelines.datasets.blocks_by_size)."""
    options = blocks_by_size([str(path) for path in directory.glob("*.parquet")])
    return read_parquet(str(directory), file_extensions=["parquet"], **options)


def _mark_done(directory: Path, key: str, stats: dict) -> None:
    (directory / "step_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (directory / MARKER).write_text(key + "\n")


def _counts(directory: Path) -> tuple[int, int]:
    """(rows, kept rows) of a materialised step, read from the parquet footers and one column.

    Run storage is a local or shared filesystem (see LoomConfig.storage), so the driver reads
    it directly: a Ray Data count costs seconds of task scheduling per step.
    """
    import pyarrow.dataset as pads

    files = pads.dataset(sorted(str(p) for p in directory.glob("*.parquet")), format="parquet")
    return files.count_rows(), files.count_rows(filter=pads.field("reject_reason").is_null())


def step_dir_names(config: DataConfig) -> list[str]:
    """``steps/`` subdirectories in order: ``00-read``, then ``NN-name`` for each configured step."""
    return ["00-read"] + [f"{index:02d}-{step.type}" for index, step in enumerate(config.steps, start=1)]


def curate(
    config: DataConfig, out: Path, bar: PartsProgress | None = None
) -> tuple[object, list[dict], dict[str, dict]]:
    """Read, then run every configured step; each step's output is materialised under
    ``steps/NN-name/`` with a completion marker, so a rerun after a crash resumes after the
    last finished step. Returns (marked dataset, funnel, per-step stats)."""
    steps_dir = out / STEPS_DIR
    steps_dir.mkdir(parents=True, exist_ok=True)
    names = step_dir_names(config)
    key = _step_key("", {"sources": [s.model_dump(mode="json") for s in config.sources], "max": config.max_documents})
    ds, produced = _cached(steps_dir / names[0], key, lambda: read_documents(config))
    if produced:
        _mark_done(steps_dir / names[0], key, {})
    documents_in, kept = _counts(steps_dir / names[0])
    funnel = [{"step": "read", "documents": documents_in, "kept": kept}]
    if bar is not None:
        bar.sized(documents_in)
        bar.done(names[0], f"read {documents_in:,} documents", resumed=not produced)
    step_stats: dict[str, dict] = {}
    for index, step_config in enumerate(config.steps, start=1):
        step = step_config.build()
        key = _step_key(key, step_config.model_dump(mode="json"))
        directory = steps_dir / names[index]
        upstream = ds
        ds, produced = _cached(directory, key, lambda step=step, upstream=upstream: step.apply(upstream))
        if produced:
            _mark_done(directory, key, step.stats())
        if bar is not None:
            bar.done(directory.name, resumed=not produced)
        step_stats[directory.name] = json.loads((directory / "step_stats.json").read_text())
        rows, kept = _counts(directory)
        if rows != documents_in:
            raise RuntimeError(
                f"data: step {step.name} turned {documents_in} rows into {rows}; steps must mark, not drop"
            )
        funnel.append({"step": step.name, "documents": rows, "kept": kept})
    return ds, funnel, step_stats


def _drop_counts(rejected) -> tuple[dict[str, int], dict[str, int]]:
    """Rejects counted by step and by reason code (reasons read "step: code (detail)")."""
    by_step: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    for batch in rejected.select_columns(["reject_reason"]).iter_batches(batch_format="pyarrow"):
        for reason in batch.column("reject_reason").to_pylist():
            by_step[reason.split(":", 1)[0]] += 1
            by_reason[reason_key(reason)] += 1
    return dict(sorted(by_step.items())), dict(sorted(by_reason.items()))


def _tokens_by_source(tokenized) -> dict[str, int]:
    return {
        row["source"]: int(row["sum(num_tokens)"])
        for row in tokenized.groupby("source", num_partitions=1).sum("num_tokens").take_all()
    }


def plot_funnel(funnel: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = [row["step"] for row in funnel]
    kept = [row["kept"] for row in funnel]
    bars = ax.barh(names[::-1], kept[::-1], color="#4c72b0")
    ax.bar_label(bars, labels=[f"{k:,}" for k in kept[::-1]], padding=3, fontsize=8)
    ax.set(xlabel="documents kept after the step", title=title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_tokenizer(config: DataConfig, kept, outputs: DataOutputs) -> Path:
    """The run's tokenizer: the configured one copied, or a byte-level BPE trained on the kept text
    (a sample of it past ``tokenizer_train_chars``)."""
    tokenizer_dir = outputs.tokenizer
    if config.tokenizer_path:
        shutil.copytree(config.tokenizer_path, tokenizer_dir)
    else:
        from pipelines.model.tokenizer import iter_texts, train_bpe

        texts = kept.select_columns(["doc_id", "text"])
        total = texts.map_batches(_text_chars, batch_format="pyarrow").sum("chars") or 0
        if total > config.tokenizer_train_chars:
            fraction = config.tokenizer_train_chars / total
            texts = texts.map_batches(_doc_id_sample, fn_kwargs={"fraction": fraction}, batch_format="pyarrow")
            log.info("data: tokenizer trained on a %.1f%% sample of %d characters", 100 * fraction, total)
        train_bpe(iter_texts(texts.iter_batches(batch_size=256)), config.vocab_size, tokenizer_dir)
    return tokenizer_dir


def _text_chars(table):
    import pyarrow as pa
    import pyarrow.compute as pc

    return pa.table({"chars": pc.utf8_length(table.column("text")).cast(pa.int64())})


def _doc_id_sample(table, fraction: float):
    """The rows whose doc_id's CRC-32, as a fraction of 2**32, is below ``fraction``."""
    import zlib

    import pyarrow as pa

    bound = fraction * 2**32
    keep = [zlib.crc32(doc_id.encode()) < bound for doc_id in table.column("doc_id").to_pylist()]
    return table.filter(pa.array(keep, pa.bool_()))


def tokenize_and_mix(config: DataConfig, kept, tokenizer_dir: Path, seed: int):
    """Token ids per document (an actor pool, one tokenizer load per actor), downsampled by document
    to the configured source mix. Returns (tokenized, tokens per source, mix stats or None)."""
    import ray.data

    with _timed("tokenize"):
        tokenized = kept.map_batches(
            Tokenize,
            fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir)},
            batch_size=config.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=config.tokenize_actors),
        ).materialize()
    with _timed("token count"):
        tokens_per_source = _tokens_by_source(tokenized)
    if not config.mix:
        return tokenized, tokens_per_source, None
    targets = mix_token_targets(tokens_per_source, config.mix)
    to_cut = {source: target for source, target in targets.items() if target < tokens_per_source[source]}
    with _timed("mix cutoffs"):
        cut = mix_cutoffs(tokenized, to_cut, seed)
    # Not materialised: packing reads the cut once, and the cutoffs already say what it keeps.
    tokenized = tokenized.map_batches(
        keep_until_cutoff, fn_kwargs={"cutoffs": cut.cutoffs, "seed": seed}, batch_format="pyarrow"
    )
    mixed = {**tokens_per_source, **cut.tokens}
    total = sum(mixed.values()) or 1
    weight_sum = sum(config.mix.values())
    mix_stats = {
        source: {
            "target_share": config.mix[source] / weight_sum,
            "share": mixed.get(source, 0) / total,
            "target_tokens": targets[source],
            "tokens_before": tokens_per_source.get(source, 0),
            "tokens_after": mixed.get(source, 0),
        }
        for source in config.mix
    }
    return tokenized, mixed, mix_stats


def pack_and_split(config: DataConfig, tokenized, outputs: DataOutputs, seed: int) -> dict[str, int]:
    """Pack into ``seq_len`` sequences, shuffle, hold out ``val_fraction``, write the shards; the counts."""
    packed = packed_in_order(tokenized, config.seq_len, config.batch_size, seed)
    with _timed("pack, shuffle and split"):
        if config.val_fraction > 0:
            train, val = packed.split_proportionately([1.0 - config.val_fraction])
        else:
            train, val = packed.materialize(), None
    # Both halves are materialised by the split: counting them is cheap, and done once.
    sequences = {"train": train.count(), "val": val.count() if val is not None else 0}
    if sequences["train"] == 0:
        raise RuntimeError(
            f"data: no training sequence of {config.seq_len} tokens could be packed from the curated "
            "documents; add text or lower data.seq_len"
        )
    with _timed("write"):
        train.write_parquet(str(outputs.train), min_rows_per_file=config.rows_per_shard)
        if sequences["val"]:
            val.write_parquet(str(outputs.val), min_rows_per_file=config.rows_per_shard)
    return sequences


def write_report(run: RunDir, stats: dict, step_stats: dict[str, dict]) -> Path:
    """``stats.json`` and the plots: the funnel, and each perplexity step's histogram."""
    DataOutputs.at(run).stats.write_text(json.dumps(stats, indent=2) + "\n")
    plot = plot_funnel(stats["funnel"], run.root / "report" / "data_funnel.png", f"{run.root.name}: data funnel")
    for name, found in step_stats.items():
        if found.get("histogram", {}).get("counts"):
            plot_histogram(found["histogram"], found["threshold"], run.root / "report" / f"data_{name}.png", name)
    return plot


def run_data(config: DataConfig, run: RunDir, seed: int) -> StageResult:
    """curate -> tokenize + mix -> pack + split -> report."""
    with shuffled_by(config.shuffle):
        return _run_data(config, run, seed)


def _run_data(config: DataConfig, run: RunDir, seed: int) -> StageResult:
    import ray.data

    # Deterministic output for the same input and seed (limits, shuffles and splits see rows in order).
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    out = run.begin(DataOutputs.stage)
    outputs = DataOutputs.at(run)
    # Not steps/: it is how a rerun resumes after a crash.
    for half_written in (outputs.train, outputs.val, outputs.rejects, outputs.tokenizer, outputs.heldout):
        shutil.rmtree(half_written, ignore_errors=True)

    parts = [*step_dir_names(config), "tokenizer", "tokenize and mix", "pack and write"]
    with PartsProgress("data", parts, run.root.parent / PROGRESS_PROFILE) as bar:
        marked, funnel, step_stats = curate(config, out, bar)
        documents_in = funnel[0]["documents"]
        kept, rejects = split_kept(marked)
        with _timed("rejects and count"):
            rejects.write_parquet(str(outputs.rejects))
            documents_out = kept.count()
        log.info("data: %d documents in, %d kept", documents_in, documents_out)
        with _timed("held out"):
            kept, heldout = hold_out(kept, config.heldout_documents, seed)
            documents_heldout = write_heldout(heldout, outputs.heldout)

        with _timed("tokenizer"):
            tokenizer_dir = write_tokenizer(config, kept, outputs)
        bar.done("tokenizer", f"{documents_out:,} documents kept, tokenizer written")
        tokenized, tokens_per_source, mix_stats = tokenize_and_mix(config, kept, tokenizer_dir, seed)
        bar.done("tokenize and mix", f"{sum(tokens_per_source.values()):,} tokens")
        sequences = pack_and_split(config, tokenized, outputs, seed)
        bar.done("pack and write", f"{sequences['train']:,} + {sequences['val']:,} sequences")

    drops_by_step, drops_by_reason = _drop_counts(rejects)
    tokens_in = sum(tokens_per_source.values())
    packed_tokens = (sequences["train"] + sequences["val"]) * config.seq_len
    stats = {
        "documents_in": documents_in,
        "documents_out": documents_out,
        "drops_by_step": drops_by_step,
        "drops_by_reason": drops_by_reason,
        "funnel": funnel,
        "steps": step_stats,
        "documents_rejected": documents_in - documents_out,
        "documents_heldout": documents_heldout,
        "tokens": tokens_in,
        "tokens_by_source": tokens_per_source,
        "mix": mix_stats,
        "tokens_packed": packed_tokens,
        "tokens_dropped_at_pack_tail": tokens_in - packed_tokens,
        "sequences": sequences,
        "seq_len": config.seq_len,
    }
    plot = write_report(run, stats, step_stats)
    export_gauges(run.root.name, stats)
    return StageResult(
        inputs={"sources": source_fingerprint(config, cache=run.root / SOURCES_CACHE)},
        outputs={
            "train": str(outputs.train),
            "val": str(outputs.val) if sequences["val"] else "",
            "tokenizer": str(tokenizer_dir),
            "rejects": str(outputs.rejects),
            "heldout": str(outputs.heldout) if documents_heldout else "",
            "stats": str(outputs.stats),
            "funnel_plot": str(plot),
        },
        metrics={k: stats[k] for k in ("documents_in", "documents_out", "tokens", "tokens_packed", "sequences")},
    )
