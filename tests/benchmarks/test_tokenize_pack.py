"""Tokenize + pack on Ray Data (actor pool) against `tokenizers` batch encoding in one process.

Two corpus sizes tell the pool's fixed start-up (new worker processes import Ray Data before the
first batch) from its cost per token: the stdlib sources, and those plus installed packages' sources.
On each corpus the one-process baselines and the Ray pipeline run alternately, three rounds, with Ray up.
"""

from __future__ import annotations

import site
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from tests.benchmarks.conftest import comparison, side_by_side, timed

pytestmark = pytest.mark.benchmark
SEQ_LEN = 512
#: The larger corpus: about this many times the stdlib's characters.
LARGE_FACTOR = 4
#: Documents per batch, in Loom's actors and in the batched baseline.
BATCH_SIZE = 128
#: One-process contender -> (tokenizers method, documents per call; 0: the whole corpus in one call).
BASELINES = {
    "encode_batch": ("encode_batch", 0),
    "encode_batch_fast": ("encode_batch_fast", 0),
    f"encode_batch_fast x{BATCH_SIZE}": ("encode_batch_fast", BATCH_SIZE),
}


def read_texts(paths) -> list[str]:
    texts = []
    for path in paths:
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            continue
    return texts


def package_texts(chars: int) -> list[str]:
    """Installed packages' Python sources in path order, up to ``chars`` characters (pinned versions: fixed)."""
    texts, total = [], 0
    for path in sorted(Path(site.getsitepackages()[0]).rglob("*.py")):
        for text in read_texts([path]):
            texts.append(text)
            total += len(text)
        if total >= chars:
            break
    return texts


def encode_in_one_process(tokenizer_json: Path, texts: list[str], method: str, batch_size: int) -> int:
    """Tokens, through a fresh tokenizer (no warm word cache; loaded in the time, as each actor loads its
    own) plus the same EOS appending.

    ``batch_size`` 0 encodes the whole corpus in one call."""
    from tokenizers import Tokenizer

    from pipelines.model.tokenizer import EOS_TOKEN

    fast = Tokenizer.from_file(str(tokenizer_json))
    eos = fast.token_to_id(EOS_TOKEN)
    parts = []
    for first in range(0, len(texts), batch_size or len(texts)):
        encoded = getattr(fast, method)(texts[first : first + (batch_size or len(texts))], add_special_tokens=False)
        parts.extend(np.asarray(e.ids + [eos], dtype=np.int32) for e in encoded)
    return len(np.concatenate(parts))


def test_tokenize_pack_throughput(tmp_path, record_benchmark):
    import ray
    import ray.data

    from cluster.config import ClusterConfig
    from cluster.connect import connect
    from pipelines.data.pack import Tokenize, pack
    from pipelines.data.readers import stdlib_files
    from pipelines.model.tokenizer import train_bpe

    stdlib = read_texts(stdlib_files())
    corpora = {
        "stdlib": stdlib,
        "stdlib + packages": stdlib + package_texts((LARGE_FACTOR - 1) * sum(map(len, stdlib))),
    }
    tokenizer_dir = train_bpe(stdlib[:300], 4096, tmp_path / "tok")

    def tokenize_and_pack(dataset) -> int:
        tokenized = dataset.map_batches(
            Tokenize,
            fn_constructor_kwargs={"tokenizer_dir": str(tokenizer_dir)},
            batch_size=BATCH_SIZE,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=2),
        )
        return tokenized.map_batches(
            pack, fn_kwargs={"seq_len": SEQ_LEN}, batch_size=BATCH_SIZE, batch_format="pyarrow"
        ).count()

    # encode_batch on the whole corpus is the call the issue names; encode_batch_fast (no character offsets)
    # is the one Loom's actors make, here also in the actors' batches of BATCH_SIZE, which is the same work
    # as the pool's without Ray. All four alternate, round by round, on the same texts, with Ray up.
    connect(ClusterConfig(num_cpus=8))
    quantities, tokens, comparisons = {}, {}, []
    for name, texts in corpora.items():
        rows = [{"doc_id": f"{i:016x}", "text": t, "source": "python"} for i, t in enumerate(texts)]
        ds = ray.data.from_items(rows).materialize()
        tokenize_and_pack(ds.limit(64))  # warm-up: Ray starts its worker processes once, as in the dedup benchmark
        contenders = {
            contender: timed(
                partial(encode_in_one_process, tokenizer_dir / "tokenizer.json", texts, method, batch_size)
            )
            for contender, (method, batch_size) in BASELINES.items()
        }
        contenders["Ray"] = timed(partial(tokenize_and_pack, ds))
        runs = side_by_side(contenders)
        tokens[name] = runs["encode_batch"][0][1]
        assert all(result == tokens[name] for c in BASELINES for _, result in runs[c]), name
        for _, ray_rows in runs["Ray"]:
            # Packing cuts each batch's tail, so the row count differs from one flat stream only by the tails.
            assert abs(ray_rows - tokens[name] // SEQ_LEN) <= len(texts) // BATCH_SIZE + 1, (name, ray_rows)
        for contender, values in runs.items():
            label = "Ray Data pool" if contender == "Ray" else contender
            quantities[f"{name}: {label} tokens/s"] = [tokens[name] / seconds for seconds, _ in values]
        for contender in BASELINES:
            comparisons.append(
                comparison(
                    f"tokens/s, {name}, vs {contender}",
                    f"tokens/s, {name} ({tokens[name] / 1e6:.1f}M tokens), vs {contender}",
                    quantities,
                    f"{name}: Ray Data pool tokens/s",
                    f"{name}: {contender} tokens/s",
                )
            )
        del ds
    ray.shutdown()
    # The headline: the larger corpus against the baseline.
    comparisons.sort(key=lambda c: c["name"] != "tokens/s, stdlib + packages, vs encode_batch")
    record_benchmark(
        "tokenize_pack",
        stage="data: tokenize + pack",
        measure="tokenize + EOS + pack: Ray Data actor pool (2 actors) vs tokenizers in one process",
        inputs={
            "corpora": {name: {"documents": len(texts), "tokens": tokens[name]} for name, texts in corpora.items()},
            "vocab_size": 4096,
            "seq_len": SEQ_LEN,
            "batch_size": BATCH_SIZE,
            "actors": 2,
        },
        quantities=quantities,
        comparisons=comparisons,
    )
