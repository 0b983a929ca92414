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
import pyarrow.compute as pc

from pipelines.data.components import _distinct, connected_components
from pipelines.data.minhash import EMPTY, LSHParams, band_keys, permutations, signatures
from pipelines.data.steps import Step, with_columns
from pipelines.data.utils import BROADCAST_BYTES, LOCAL_EDGES, arrow_tables, hash_shuffled, small_side_join

_WHITESPACE = re.compile(r"\s+")


def content_hash(text: str) -> str:
    """Hash of the text with case and whitespace runs folded: the exact-duplicate key."""
    return hashlib.sha256(_WHITESPACE.sub(" ", text.lower()).encode()).hexdigest()


def doc_node(doc_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A document's graph node: its 16-hex-digit doc_id read as an unsigned 64-bit integer.

    The mapping keeps order, so "smallest node" and "smallest doc_id" pick the same document.
    """
    return np.array([int(doc_id, 16) for doc_id in doc_ids.to_pylist()], dtype=np.uint64)


class ExactDedup(Step):
    """Keep one document per content hash: the one with the smallest doc_id (then source: a file two
    sources both list gives two rows with one doc_id, and only one of them is kept).

    Only the narrow (hash, doc_id) table is shuffled, and aggregated by Ray Data (count and smallest
    doc_id per hash); the hashes held more than once come back to the driver (a few MB at a million
    documents with a few percent duplicated) and every block marks its duplicates against them. A
    ``map_groups`` over the documents called Python once per distinct text and moved every text
    through the shuffle: 41 s for 40,000 documents.
    """

    name = "exact_dedup"

    def __init__(self, num_partitions: int = 8):
        # Ray's default (200 hash partitions) costs minutes of task overhead on small corpora.
        self.num_partitions = num_partitions

    @staticmethod
    def _hash(table: pa.Table) -> pa.Table:
        live = pc.is_null(table.column("reject_reason")).to_pylist()
        texts = table.column("text").to_pylist()
        hashes = [content_hash(t) if keep else None for t, keep in zip(texts, live, strict=True)]
        # The keeper's rank: doc_id, then source (the unit separator sorts below every printable character).
        rank = pc.binary_join_element_wise(table.column("doc_id"), table.column("source"), KEY_SEPARATOR)
        return with_columns(table, content_hash=hashes, keeper_rank=rank)

    def apply(self, ds):
        from ray.data.aggregate import Count, Min
        from ray.data.expressions import col

        hashed = ds.map_batches(self._hash, batch_format="pyarrow").materialize()
        held_twice = (
            hashed.select_columns(["content_hash", "keeper_rank"])
            .filter(expr=col("content_hash").is_not_null())
            .groupby("content_hash", num_partitions=self.num_partitions)
            .aggregate(Count(), Min("keeper_rank"))
            .filter(expr=col("count()") > 1)
            .select_columns(["content_hash", "min(keeper_rank)"])
            .take_all()
        )
        keepers = pa.table(
            {
                "content_hash": pa.array([row["content_hash"] for row in held_twice], pa.string()),
                "keeper_rank": pa.array([row["min(keeper_rank)"] for row in held_twice], pa.string()),
            }
        )
        return hashed.map_batches(mark_exact_duplicates, fn_kwargs={"keepers": keepers}, batch_format="pyarrow")


KEY_SEPARATOR = "\x1f"


def mark_exact_duplicates(table: pa.Table, keepers: pa.Table) -> pa.Table:
    """Ray Data batch function: a live row whose hash has a keeper other than itself becomes a reject."""
    position = pc.index_in(table.column("content_hash"), value_set=keepers.column("content_hash"))
    keeper_rank = pc.take(keepers.column("keeper_rank"), position)
    duplicate = pc.fill_null(pc.not_equal(table.column("keeper_rank"), keeper_rank), False)
    keeper = pc.list_element(pc.split_pattern(keeper_rank, KEY_SEPARATOR, max_splits=1), 0)
    reason = pc.binary_join_element_wise("exact_dedup: duplicate (of ", keeper, ")", "")
    marked = pc.if_else(duplicate, reason, table.column("reject_reason")).cast(pa.string())
    table = table.drop_columns(["content_hash", "keeper_rank"])
    return table.set_column(table.schema.get_field_index("reject_reason"), "reject_reason", marked)


def _live(table: pa.Table) -> pa.Table:
    """The rows no earlier step dropped: only they take part in near-dedup."""
    return table.filter(pc.is_null(table.column("reject_reason")))


#: Bucket rows are grouped by the top bits of their key into 2^SHARD_BITS shards, each sorted once
#: to find its shared buckets: a shard is 1/64 of (documents x bands) rows, 6 MB at a million documents.
SHARD_BITS = 6
_SHARD_SHIFT = np.uint64(64 - SHARD_BITS)


def minhash_buckets(table: pa.Table, params: LSHParams, ngram: int) -> pa.Table:
    """Ray Data batch function: every live document's LSH bucket keys, one row per (band, document).

    Plain tasks, not an actor pool: the permutation table is cached per worker process, and
    tasks reuse Ray's warm workers where a new actor pool pays process start-up each time.
    """
    a, b = permutations(params.num_perm, params.seed)
    table = _live(table)
    signature = signatures(table.column("text"), ngram, a, b)
    nodes = doc_node(table.column("doc_id"))
    has_shingles = ~(signature == EMPTY).all(axis=1)
    keys = band_keys(signature[has_shingles], params.bands, params.rows).ravel()
    return pa.table(
        {
            "shard": pa.array((keys >> _SHARD_SHIFT).astype(np.uint8), pa.uint8()),
            "bucket": pa.array(keys, pa.uint64()),
            "node": pa.array(np.repeat(nodes[has_shingles], params.bands), pa.uint64()),
        }
    )


def _shard_edges(shard: pa.Table) -> pa.Table:
    """One shard's bucket rows -> an edge from each document to the smallest document of its
    bucket, for the buckets two documents or more share. A sort, not a hash aggregate and a join:
    a shard is small and every bucket lies within one."""
    if shard.num_rows == 0:
        return pa.table({"u": pa.array([], pa.uint64()), "v": pa.array([], pa.uint64())})
    bucket, node = shard.column("bucket").to_numpy(), shard.column("node").to_numpy()
    order = np.lexsort((node, bucket))
    bucket, node = bucket[order], node[order]
    starts = np.flatnonzero(np.concatenate([[True], bucket[1:] != bucket[:-1]]))
    root = np.repeat(node[starts], np.diff(np.append(starts, len(bucket))))
    keep = node != root
    return pa.table({"u": pa.array(node[keep], pa.uint64()), "v": pa.array(root[keep], pa.uint64())})


def shingle_sets(table: pa.Table, ngram: int, nodes: np.ndarray | None = None) -> pa.Table:
    """Ray Data batch function: each live document's sorted distinct shingle hashes (for verification);
    only those of ``nodes`` (sorted), when given: the documents some candidate pair names."""
    from pipelines.data.minhash import shingle_hashes, word_hashes

    keep = pc.is_null(table.column("reject_reason")).to_numpy(zero_copy_only=False)
    if nodes is not None:
        wanted = doc_node(table.column("doc_id"))
        index = np.searchsorted(nodes, wanted).clip(0, max(len(nodes) - 1, 0))
        keep &= nodes[index] == wanted if len(nodes) else False
    # One filter: the texts are copied once, and only those looked up.
    table = table.select(["doc_id", "text"]).filter(pa.array(keep))
    hashes, doc_of = shingle_hashes(*word_hashes(table.column("text")), ngram)
    # One sort of the whole batch by (document, hash) as one 64-bit key, instead of a scan per document.
    keys = (doc_of.astype(np.uint64) << np.uint64(32)) | hashes
    keys.sort()
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if len(keys) else keys
    doc_of = (keys >> np.uint64(32)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(doc_of, minlength=table.num_rows))]).astype(np.int32)
    sets = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(keys.astype(np.uint32), pa.uint32()))
    return pa.table({"node": pa.array(doc_node(table.column("doc_id")), pa.uint64()), "shingles": sets})


def _verified(table: pa.Table, threshold: float) -> pa.Table:
    """Keep candidate edges whose true Jaccard similarity over shingle sets reaches ``threshold``.

    Vectorised over the batch: each side's (pair, shingle) keys are concatenated and sorted; as each
    set holds distinct values, a key seen twice is one shared shingle of that pair."""
    pairs = table.num_rows
    if pairs == 0:
        return table.select(["u", "v"])
    sides = [table.column(name).combine_chunks() for name in ("shingles_u", "shingles_v")]
    lengths = [pc.list_value_length(side).fill_null(0).to_numpy().astype(np.int64) for side in sides]
    keys = np.concatenate(
        [
            (np.repeat(np.arange(pairs, dtype=np.uint64), length) << np.uint64(32))
            | side.flatten().to_numpy(zero_copy_only=False).astype(np.uint64)
            for side, length in zip(sides, lengths, strict=True)
        ]
    )
    keys.sort()
    shared = keys[1:][keys[1:] == keys[:-1]] >> np.uint64(32)
    intersection = np.bincount(shared.astype(np.int64), minlength=pairs)
    union = lengths[0] + lengths[1] - intersection
    keep = (union > 0) & (intersection / np.maximum(union, 1) >= threshold)
    return table.select(["u", "v"]).filter(pa.array(keep))


def _verified_against(edges: pa.Table, sets: pa.Table, threshold: float) -> pa.Table:
    """``_verified`` for a batch of edges, each side's shingles looked up in ``sets`` (sorted by node)."""
    nodes = sets.column("node").to_numpy()
    sides = {}
    found = np.ones(edges.num_rows, dtype=bool)
    for side in ("u", "v"):
        wanted = edges.column(side).to_numpy()
        index = np.searchsorted(nodes, wanted).clip(0, max(len(nodes) - 1, 0))
        found &= nodes[index] == wanted
        sides[side] = index
    edges = edges.filter(pa.array(found))
    shingles = sets.column("shingles")
    return _verified(
        edges.append_column("shingles_u", shingles.take(sides["u"][found])).append_column(
            "shingles_v", shingles.take(sides["v"][found])
        ),
        threshold,
    )


class NearDedup(Step):
    """Near-duplicate removal: candidate pairs from a subclass, connected components of the
    candidate graph computed across the cluster, one survivor (smallest doc_id) per component."""

    def __init__(self, num_partitions: int, local_components_edges: int = LOCAL_EDGES):
        self.num_partitions, self.local_components_edges = num_partitions, local_components_edges
        #: Filled by ``apply``: sizes of the duplicate clusters found (members, survivor included).
        self.cluster_sizes: list[int] = []

    def candidate_edges(self, ds):
        """Dataset of (u, v) uint64 node pairs judged near-duplicates among ``ds``'s live rows."""
        raise NotImplementedError

    def parameters(self) -> dict:
        return {}

    def stats(self) -> dict:
        histogram: dict[str, int] = {}
        for size in self.cluster_sizes:
            histogram[str(size)] = histogram.get(str(size), 0) + 1
        return {
            **self.parameters(),
            "duplicate_clusters": len(self.cluster_sizes),
            "documents_in_clusters": sum(self.cluster_sizes),
            "largest_cluster": max(self.cluster_sizes, default=0),
            "cluster_size_histogram": histogram,
        }

    def _shared_buckets(self, buckets):
        """Rows of ``buckets`` (bucket, node, ...) whose bucket holds two documents or more, with
        the bucket's smallest node as ``root``."""
        from ray.data.aggregate import Count, Min

        shared = (
            hash_shuffled(buckets)
            .groupby("bucket", num_partitions=self.num_partitions)
            .aggregate(Min("node", alias_name="root"), Count(alias_name="size"))
            .filter(expr=_col("size") >= 2)
        )
        return small_side_join(buckets, shared.materialize(), "bucket", "inner", self.num_partitions)

    def apply(self, ds):
        # Read twice (candidate pairs, then marking), so computed once. Rows dropped upstream stay in
        # place: the batch functions skip them and marking keeps their first reason.
        ds = ds.materialize()
        roots = connected_components(
            self.candidate_edges(ds), self.num_partitions, local_edges=self.local_components_edges
        ).materialize()
        self.cluster_sizes = _cluster_sizes(roots)
        if not self.cluster_sizes:
            return ds
        assignment = roots.rename_columns({"u": "node", "v": "root"})
        with_node = ds.map_batches(_add_node, batch_format="pyarrow")
        marked = small_side_join(with_node, assignment, "node", "left_outer", self.num_partitions)
        return marked.map_batches(_mark_near_duplicates, fn_kwargs={"step": self.name}, batch_format="pyarrow")


class MinHashDedup(NearDedup):
    """MinHash signatures, LSH bands grouped across the cluster; each candidate pair's true Jaccard
    similarity is checked before it joins a cluster (``verify``, on by default). The defaults are the
    recipe's (``MinHashDedupStep``): bands that lean to recall at the threshold, verification for precision."""

    name = "minhash_dedup"

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        ngram: int = 5,
        seed: int = 1,
        false_positive_weight: float = 0.05,
        verify: bool = True,
        num_partitions: int = 8,
        local_components_edges: int = LOCAL_EDGES,
    ):
        super().__init__(num_partitions, local_components_edges)
        self.threshold, self.ngram, self.verify = threshold, ngram, verify
        self.params = LSHParams.for_threshold(threshold, num_perm, seed, false_positive_weight)

    def parameters(self) -> dict:
        return {"bands": self.params.bands, "rows_per_band": self.params.rows}

    def candidate_edges(self, ds):
        buckets = ds.map_batches(
            minhash_buckets, fn_kwargs={"params": self.params, "ngram": self.ngram}, batch_format="pyarrow"
        ).materialize()
        edges = buckets.groupby("shard", num_partitions=self.num_partitions).map_groups(
            _shard_edges, batch_format="pyarrow"
        )
        if not self.verify:
            return edges
        # A pair sharing several bands arrives once per band: each distinct pair is verified once.
        edges = _nonempty_blocks(_distinct(edges, self.num_partitions))
        if edges is None:
            return _empty_edges()
        # Shingle sets only of the documents a candidate pair names: the rest are never looked up.
        nodes = _edge_nodes(edges)
        sets = _nonempty_blocks(
            ds.map_batches(shingle_sets, fn_kwargs={"ngram": self.ngram, "nodes": nodes}, batch_format="pyarrow")
        )
        if sets is None:
            return _empty_edges()
        if sets.size_bytes() <= BROADCAST_BYTES:
            # Like small_side_join: the candidates' shingle sets go to every task, the edges stay put.
            table = pa.concat_tables(arrow_tables(sets)).sort_by("node")
            return edges.map_batches(
                _verified_against, fn_kwargs={"sets": table, "threshold": self.threshold}, batch_format="pyarrow"
            )
        with_u = edges.join(
            sets.rename_columns({"node": "u", "shingles": "shingles_u"}), "inner", self.num_partitions, on=("u",)
        )
        both = with_u.join(
            sets.rename_columns({"node": "v", "shingles": "shingles_v"}), "inner", self.num_partitions, on=("v",)
        )
        return both.map_batches(_verified, fn_kwargs={"threshold": self.threshold}, batch_format="pyarrow")


def _nonempty_blocks(ds):
    """``ds`` materialised without its empty blocks, or None when every block is empty.

    A map over an empty block passes it on without calling the function, so it has no columns;
    Ray Data's hash join then fails on a partition that only such blocks reach ("unable to find
    column"). The blocks' metadata says which are empty; no block is read."""
    import ray.data

    kept = [
        entry.ref
        for bundle in ds.materialize().iter_internal_ref_bundles()
        for entry in bundle.blocks
        if entry.metadata.num_rows is None or entry.metadata.num_rows > 0
    ]
    return ray.data.from_arrow_refs(kept) if kept else None


def _edge_nodes(edges) -> np.ndarray:
    """The sorted distinct nodes of an edge list (gathered in the driver: 8 bytes a node)."""
    import ray

    tables = ray.get(edges.to_arrow_refs())
    return np.unique(np.concatenate([t.column(name).to_numpy() for t in tables for name in ("u", "v")]))


def _empty_edges():
    import ray.data

    return ray.data.from_arrow(pa.table({"u": pa.array([], pa.uint64()), "v": pa.array([], pa.uint64())}))


def simhash_fingerprints(texts: pa.Array | pa.ChunkedArray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit SimHash (Charikar 2002) of each text over its word n-gram shingles, whether it has
    any shingle), vectorised over the batch."""
    from pipelines.data.minhash import fmix64, shingle_hashes, word_hashes

    words, offsets = word_hashes(texts)
    hashes, doc_of = shingle_hashes(words, offsets, ngram)
    documents = len(offsets) - 1
    wide = fmix64(hashes.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    positions = np.arange(64, dtype=np.uint64)
    votes = np.zeros((documents, 64), dtype=np.int64)
    for start in range(0, len(wide), 8192):
        bits = ((wide[start : start + 8192, None] >> positions) & np.uint64(1)).astype(np.int64) * 2 - 1
        np.add.at(votes, doc_of[start : start + 8192], bits)
    fingerprints = ((votes > 0).astype(np.uint64) << positions).sum(axis=1, dtype=np.uint64)
    return fingerprints, np.bincount(doc_of, minlength=documents) > 0


def simhash_buckets(table: pa.Table, ngram: int, max_hamming: int) -> pa.Table:
    """Ray Data batch function: one row per (block, live document); documents within ``max_hamming``
    bits share at least one of the ``max_hamming + 1`` blocks of their fingerprints (pigeonhole)."""
    from pipelines.data.minhash import fmix64

    table = _live(table)
    bounds = np.linspace(0, 64, max_hamming + 2).astype(int)
    fingerprints, has_shingles = simhash_fingerprints(table.column("text"), ngram)
    fingerprints, nodes = fingerprints[has_shingles], doc_node(table.column("doc_id"))[has_shingles]
    keys = [
        fmix64(((fingerprints >> np.uint64(low)) & np.uint64((1 << (high - low)) - 1)) ^ np.uint64(index << 58))
        for index, (low, high) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]
    return pa.table(
        {
            "bucket": pa.array(np.concatenate(keys), pa.uint64()),
            "node": pa.array(np.tile(nodes, len(keys)), pa.uint64()),
            "fingerprint": pa.array(np.tile(fingerprints, len(keys)), pa.uint64()),
        }
    )


def _pairs_within(group: pa.Table, max_hamming: int) -> pa.Table:
    """All pairs of one shared bucket whose fingerprints differ in at most ``max_hamming`` bits."""
    nodes, prints = group.column("node").to_numpy(), group.column("fingerprint").to_numpy()
    distance = np.bitwise_count(prints[:, None] ^ prints[None, :])
    left, right = np.nonzero(np.triu(distance <= max_hamming, k=1))
    return pa.table({"u": pa.array(nodes[left], pa.uint64()), "v": pa.array(nodes[right], pa.uint64())})


class SimHashDedup(NearDedup):
    """SimHash fingerprints; documents within ``max_hamming`` bits are near-duplicates. Cheaper to
    store than MinHash (8 bytes a document) but coarser on short documents."""

    name = "simhash_dedup"

    def __init__(
        self, max_hamming: int = 6, ngram: int = 3, num_partitions: int = 8, local_components_edges: int = LOCAL_EDGES
    ):
        super().__init__(num_partitions, local_components_edges)
        self.max_hamming, self.ngram = max_hamming, ngram

    def parameters(self) -> dict:
        return {"max_hamming": self.max_hamming, "blocks": self.max_hamming + 1}

    def candidate_edges(self, ds):
        buckets = ds.map_batches(
            simhash_buckets, fn_kwargs={"ngram": self.ngram, "max_hamming": self.max_hamming}, batch_format="pyarrow"
        ).materialize()
        shared = self._shared_buckets(buckets)
        # One call per shared bucket only: buckets of one document never reach Python.
        return (
            hash_shuffled(shared)
            .groupby("bucket", num_partitions=self.num_partitions)
            .map_groups(_pairs_within, fn_kwargs={"max_hamming": self.max_hamming}, batch_format="pyarrow")
        )


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


def _mark_near_duplicates(table: pa.Table, step: str) -> pa.Table:
    if "root" not in table.column_names:  # a join partition that met no duplicate
        return table.drop_columns(["node"])
    roots = table.column("root").to_pylist()
    reasons = table.column("reject_reason").to_pylist()
    for i, root in enumerate(roots):
        if root is not None and reasons[i] is None:
            reasons[i] = f"{step}: near-duplicate (of {root:016x})"
    return with_columns(table.drop_columns(["node", "root"]), reject_reason=reasons)


def _col(name: str):
    from ray.data.expressions import col

    return col(name)
