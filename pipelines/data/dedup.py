"""Deduplication steps: exact (normalised content hash) and near (MinHash LSH).

Both keep one document per duplicate cluster by a deterministic rule: the one
with the smallest ``doc_id``. So the surviving set depends only on the input
and the seed, not on the order of rows or the number of workers.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa

from pipelines.data.components import connected_components
from pipelines.data.minhash import EMPTY, LSHParams, band_keys, permutations, signatures
from pipelines.data.steps import Step, with_columns

_WHITESPACE = re.compile(r"\s+")


def content_hash(text: str) -> str:
    """Hash of the text with case and whitespace runs folded: the exact-duplicate key."""
    return hashlib.sha256(_WHITESPACE.sub(" ", text.lower()).encode()).hexdigest()


def doc_node(doc_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A document's graph node: its 16-hex-digit doc_id read as an unsigned 64-bit integer.

    The mapping keeps order, so "smallest node" and "smallest doc_id" pick the same document.
    """
    return np.array([int(doc_id, 16) for doc_id in doc_ids.to_pylist()], dtype=np.uint64)


def _kept_and_rejected(ds):
    from ray.data.expressions import col

    return ds.filter(expr=col("reject_reason").is_null()), ds.filter(expr=col("reject_reason").is_not_null())


class ExactDedup(Step):
    """Keep one document per content hash: the one with the smallest doc_id."""

    name = "exact_dedup"

    def __init__(self, num_partitions: int = 8):
        # Ray's default (200 hash partitions) costs minutes of task overhead on small corpora.
        self.num_partitions = num_partitions

    def _hash(self, table: pa.Table) -> pa.Table:
        texts = table.column("text").to_pylist()
        return with_columns(table, content_hash=[content_hash(t) for t in texts])

    @staticmethod
    def _mark(group: pa.Table) -> pa.Table:
        group = group.sort_by("doc_id")
        keeper = group.column("doc_id")[0].as_py()
        reasons = [None] + [f"exact_dedup: duplicate (of {keeper})"] * (group.num_rows - 1)
        return with_columns(group, reject_reason=reasons)

    def apply(self, ds):
        kept, rejected = _kept_and_rejected(ds)
        hashed = kept.map_batches(self._hash, batch_format="pyarrow")
        marked = hashed.groupby("content_hash", num_partitions=self.num_partitions).map_groups(
            self._mark, batch_format="pyarrow"
        )
        return marked.drop_columns(["content_hash"]).union(rejected)


class MinHashBuckets:
    """Ray Data batch function: every document's LSH bucket keys, one row per (band, document)."""

    def __init__(self, params: LSHParams, ngram: int):
        self.params, self.ngram = params, ngram
        self.a, self.b = permutations(params.num_perm, params.seed)

    def __call__(self, table: pa.Table) -> pa.Table:
        signature = signatures(table.column("text"), self.ngram, self.a, self.b)
        nodes = doc_node(table.column("doc_id"))
        has_shingles = ~(signature == EMPTY).all(axis=1)
        keys = band_keys(signature[has_shingles], self.params.bands, self.params.rows)
        return pa.table(
            {
                "bucket": pa.array(keys.ravel(), pa.uint64()),
                "node": pa.array(np.repeat(nodes[has_shingles], self.params.bands), pa.uint64()),
            }
        )


def _bucket_edges(table: pa.Table) -> pa.Table:
    """Rows (bucket, node, root = smallest node in the bucket) -> edges node -> root."""
    node, root = table.column("node").to_numpy(), table.column("root").to_numpy()
    keep = node != root
    return pa.table({"u": pa.array(node[keep], pa.uint64()), "v": pa.array(root[keep], pa.uint64())})


class ShingleSets:
    """Ray Data batch function: each document's sorted distinct shingle hashes (for verification)."""

    def __init__(self, ngram: int):
        self.ngram = ngram

    def __call__(self, table: pa.Table) -> pa.Table:
        from pipelines.data.minhash import shingle_hashes, word_hashes

        hashes, doc_of = shingle_hashes(*word_hashes(table.column("text")), self.ngram)
        sets = [np.unique(hashes[doc_of == i]) for i in range(table.num_rows)]
        return pa.table(
            {
                "node": pa.array(doc_node(table.column("doc_id")), pa.uint64()),
                "shingles": pa.array(sets, pa.list_(pa.uint32())),
            }
        )


def _verified(table: pa.Table, threshold: float) -> pa.Table:
    """Keep candidate edges whose true Jaccard similarity over shingle sets reaches ``threshold``."""
    keep = []
    for left, right in zip(table.column("shingles_u").to_pylist(), table.column("shingles_v").to_pylist(), strict=True):
        union = len(set(left) | set(right))
        keep.append(union > 0 and len(np.intersect1d(left, right, assume_unique=True)) / union >= threshold)
    mask = pa.array(keep, pa.bool_())
    return table.select(["u", "v"]).filter(mask)


class MinHashDedup(Step):
    """Near-duplicate removal: MinHash signatures, LSH bands grouped across the cluster,
    connected components of the candidate graph, one survivor (smallest doc_id) per component."""

    name = "minhash_dedup"

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        ngram: int = 5,
        seed: int = 1,
        false_positive_weight: float = 0.5,
        verify: bool = False,
        num_partitions: int = 8,
    ):
        self.threshold, self.ngram, self.verify, self.num_partitions = threshold, ngram, verify, num_partitions
        self.params = LSHParams.for_threshold(threshold, num_perm, seed, false_positive_weight)
        #: Filled by ``apply``: sizes of the duplicate clusters found (members, survivor included).
        self.cluster_sizes: list[int] = []

    def stats(self) -> dict:
        histogram: dict[str, int] = {}
        for size in self.cluster_sizes:
            histogram[str(size)] = histogram.get(str(size), 0) + 1
        return {
            "bands": self.params.bands,
            "rows_per_band": self.params.rows,
            "duplicate_clusters": len(self.cluster_sizes),
            "documents_in_clusters": sum(self.cluster_sizes),
            "largest_cluster": max(self.cluster_sizes, default=0),
            "cluster_size_histogram": histogram,
        }

    def candidate_edges(self, kept):
        from ray.data.aggregate import Count, Min

        buckets = kept.map_batches(
            MinHashBuckets,
            fn_constructor_kwargs={"params": self.params, "ngram": self.ngram},
            batch_format="pyarrow",
            compute=_actor_pool(),
        ).materialize()
        shared = (
            buckets.groupby("bucket", num_partitions=self.num_partitions)
            .aggregate(Min("node", alias_name="root"), Count(alias_name="size"))
            .filter(expr=_col("size") >= 2)
        )
        members = buckets.join(shared, join_type="inner", num_partitions=self.num_partitions, on=("bucket",))
        edges = members.map_batches(_bucket_edges, batch_format="pyarrow")
        if not self.verify:
            return edges
        sets = kept.map_batches(
            ShingleSets, fn_constructor_kwargs={"ngram": self.ngram}, batch_format="pyarrow", compute=_actor_pool()
        )
        sets = sets.materialize()
        with_u = edges.join(
            sets.rename_columns({"node": "u", "shingles": "shingles_u"}), "inner", self.num_partitions, on=("u",)
        )
        both = with_u.join(
            sets.rename_columns({"node": "v", "shingles": "shingles_v"}), "inner", self.num_partitions, on=("v",)
        )
        return both.map_batches(_verified, fn_kwargs={"threshold": self.threshold}, batch_format="pyarrow")

    def apply(self, ds):
        kept, rejected = _kept_and_rejected(ds)
        kept = kept.materialize()
        roots = connected_components(self.candidate_edges(kept), num_partitions=self.num_partitions).materialize()
        self.cluster_sizes = _cluster_sizes(roots)
        if not self.cluster_sizes:
            return kept.union(rejected)
        assignment = roots.rename_columns({"u": "node", "v": "root"})
        with_node = kept.map_batches(_add_node, batch_format="pyarrow")
        marked = with_node.join(assignment, join_type="left_outer", num_partitions=self.num_partitions, on=("node",))
        return marked.map_batches(_mark_near_duplicates, batch_format="pyarrow").union(rejected)


def _cluster_sizes(roots) -> list[int]:
    """Members per duplicate cluster (survivor included), largest first."""
    counts: dict[int, int] = {}
    for batch in roots.iter_batches(batch_format="pyarrow"):
        values, sizes = np.unique(batch.column("v").to_numpy(), return_counts=True)
        for value, size in zip(values.tolist(), sizes.tolist(), strict=True):
            counts[value] = counts.get(value, 0) + size
    return sorted((size + 1 for size in counts.values()), reverse=True)


def _add_node(table: pa.Table) -> pa.Table:
    return table.append_column("node", pa.array(doc_node(table.column("doc_id")), pa.uint64()))


def _mark_near_duplicates(table: pa.Table) -> pa.Table:
    if "root" not in table.column_names:  # a join partition that met no duplicate
        return table.drop_columns(["node"])
    roots = table.column("root").to_pylist()
    reasons = table.column("reject_reason").to_pylist()
    for i, root in enumerate(roots):
        if root is not None and reasons[i] is None:
            reasons[i] = f"minhash_dedup: near-duplicate (of {root:016x})"
    return with_columns(table.drop_columns(["node", "root"]), reject_reason=reasons)


def _col(name: str):
    from ray.data.expressions import col

    return col(name)


def _actor_pool():
    import ray.data

    # The permutation tables are built once per actor, not once per batch.
    return ray.data.ActorPoolStrategy(min_size=1, max_size=2)
