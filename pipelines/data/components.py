"""Connected components of a large graph on Ray Data: alternating large-star / small-star.

Kiveris et al., "Connected Components in MapReduce and Beyond" (SoCC 2014). Each
operation is a group-by-minimum (hash-shuffled across the cluster) and a join
(broadcast while the per-node minima are small, hash-shuffled beyond), so no
node has to hold the whole graph. When neither operation changes
the edge set, every node points at the smallest node of its component.
Written here because Ray Data ships no graph algorithms; each round is a handful
of vectorised Arrow passes.

Each distributed round costs a dozen Ray Data executions (about a second of
scheduling on a small cluster, whatever the graph's size), so a graph of at most
``local_edges`` edges -- the input, or what the rounds have shrunk it to -- is
finished in one process by scipy's union-find-like traversal instead, the way a
broadcast join replaces a shuffle for a small side. 2M edges are 32 MB.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa

from pipelines.data.minhash import fmix64
from pipelines.data.utils import LOCAL_EDGES, arrow_tables, hash_shuffled, small_side_join

log = logging.getLogger(__name__)
EDGE_SCHEMA = pa.schema([("u", pa.uint64()), ("v", pa.uint64())])


class ComponentsDidNotConvergeError(RuntimeError):
    pass


def _edges(u: np.ndarray, v: np.ndarray) -> pa.Table:
    return pa.table({"u": pa.array(u, pa.uint64()), "v": pa.array(v, pa.uint64())})


def _both_directions(table: pa.Table) -> pa.Table:
    u, v = table.column("u").to_numpy(), table.column("v").to_numpy()
    keep = u != v
    u, v = u[keep], v[keep]
    return _edges(np.concatenate([u, v]), np.concatenate([v, u]))


def _larger_to_smaller(table: pa.Table) -> pa.Table:
    u, v = table.column("u").to_numpy(), table.column("v").to_numpy()
    keep = u != v
    u, v = u[keep], v[keep]
    return _edges(np.maximum(u, v), np.minimum(u, v))


def _large_star_emit(table: pa.Table) -> pa.Table:
    """Rows (u, v, m = min neighbour of u): link each larger neighbour v to min(m, u)."""
    u, v, m = (table.column(name).to_numpy() for name in ("u", "v", "m"))
    keep = v > u
    return _edges(v[keep], np.minimum(m, u)[keep])


def _small_star_emit(table: pa.Table) -> pa.Table:
    """Rows (u, v <= u, m = min of such v): link every such v, and u itself, to m."""
    u, v, m = (table.column(name).to_numpy() for name in ("u", "v", "m"))
    nodes = np.concatenate([v, u])
    roots = np.concatenate([m, m])
    keep = nodes != roots
    return _edges(nodes[keep], roots[keep])


def _fingerprint(table: pa.Table) -> pa.Table:
    u, v = table.column("u").to_numpy(), table.column("v").to_numpy()
    with np.errstate(over="ignore"):
        mixed = fmix64(fmix64(u) ^ v)
    # Sum of 32-bit halves: order-free, and an int64 sum cannot overflow for < 2^31 edges.
    return pa.table({"fp": pa.array((mixed >> np.uint64(32)).astype(np.int64))})


def _star(edges, orient, emit, num_partitions: int):
    from ray.data.aggregate import Min

    directed = hash_shuffled(edges.map_batches(orient, batch_format="pyarrow")).materialize()
    minima = directed.groupby("u", num_partitions=num_partitions).aggregate(Min("v", alias_name="m"))
    joined = small_side_join(directed, minima.materialize(), "u", "inner", num_partitions)
    return joined.map_batches(emit, batch_format="pyarrow")


def _distinct(edges, num_partitions: int):
    from ray.data.aggregate import Count

    grouped = hash_shuffled(edges).groupby(["u", "v"], num_partitions=num_partitions)
    counted = grouped.aggregate(Count(alias_name="n"))
    return counted.select_columns(["u", "v"]).materialize()


def _signature(edges) -> tuple[int, int]:
    count = edges.count()
    return count, int(edges.map_batches(_fingerprint, batch_format="pyarrow").sum("fp") or 0) if count else 0


def components_in_memory(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(node, smallest node of its component) for every node of the edge list (u, v) that is not
    its component's smallest, by scipy's connected components over the compacted node ids."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as scipy_components

    nodes, index = np.unique(np.concatenate([u, v]), return_inverse=True)  # sorted ascending
    graph = coo_matrix((np.ones(len(u), np.int8), (index[: len(u)], index[len(u) :])), shape=(len(nodes),) * 2)
    _, labels = scipy_components(graph, directed=False)
    # Nodes are sorted, so each label's first occurrence is its smallest node.
    _, first = np.unique(labels, return_index=True)
    roots = nodes[first][labels]
    keep = nodes != roots
    return nodes[keep], roots[keep]


def _finish_in_memory(edges):
    import ray
    import ray.data

    tables = arrow_tables(edges)
    if not tables:
        return ray.data.from_arrow(EDGE_SCHEMA.empty_table())
    table = pa.concat_tables(tables)
    nodes, roots = components_in_memory(table.column("u").to_numpy(), table.column("v").to_numpy())
    return ray.data.from_arrow(_edges(nodes, roots))


def connected_components(edges, num_partitions: int = 4, max_rounds: int = 64, local_edges: int = LOCAL_EDGES):
    """(u, v) uint64 edges -> (u = node, v = smallest node of its component), for every node
    that is not its component's smallest. Isolated nodes and component minima do not appear.

    Large-star/small-star rounds across the cluster until at most ``local_edges`` edges are
    left, then one process finishes (``local_edges=0``: distributed to the end)."""
    edges = edges.materialize()
    if edges.count() <= local_edges:
        return _finish_in_memory(edges)
    current = _distinct(edges.map_batches(_larger_to_smaller, batch_format="pyarrow"), num_partitions)
    previous = _signature(current)
    for round_number in range(1, max_rounds + 1):
        if previous[0] == 0:
            return current
        if previous[0] <= local_edges:
            log.info(
                "components: %d edges left after %d rounds, finished in one process", previous[0], round_number - 1
            )
            return _finish_in_memory(current)
        large = _star(current, _both_directions, _large_star_emit, num_partitions)
        small = _star(large, _larger_to_smaller, _small_star_emit, num_partitions)
        current = _distinct(small, num_partitions)
        signature = _signature(current)
        log.info("components: round %d, %d edges", round_number, signature[0])
        if signature == previous:
            return current
        previous = signature
    raise ComponentsDidNotConvergeError(f"connected components did not converge in {max_rounds} rounds")
