"""Global merge: one fragment -> segment lookup table per threshold.

Connected components of the edges whose merge score is <= t over all fragments of the
volume; segment ids are consecutive from 1 in the order of the lowest fragment id, so they
do not depend on worker timing. Fragments with no edge are segments of their own. Tables go
to the graph store, which is what makes the napari threshold slider free: changing t only
swaps the table.

Why it is written as a sweep: a volume of a few hundred GB has 10^7 and more edges, and
nine thresholds each rebuilding a sparse matrix of every edge below it costs nine times the
work and several copies of the edge list at once. The components at a higher threshold are
unions of those at a lower one, so the thresholds are visited in increasing order and each
edge is used once, at the first threshold that admits it:

* u and v are mapped to positions in the sorted fragment ids once (``searchsorted``), which
  is also the check that every edge names a known fragment;
* each edge gets the index of the first threshold with ``score <= t`` (a bucket, one
  byte), so the scores are never sorted and each threshold picks its new edges with one
  comparison of bytes;
* per threshold, the new edges are read through the current component labels (the graph
  contracted so far), scipy's ``connected_components`` joins the components they touch,
  and the labels are composed. New edges go in chunks of ``CHUNK`` so the sparse matrices
  scipy builds (it copies to float64 and transposes) stay a fixed size whatever the graph.

Renumbering keeps the order of first appearance: scipy numbers components in the order of
their first node, and composing two such numberings keeps it (the new component's first
fragment is the first fragment of its first old component). That is checked per threshold
in O(fragments) and, were it ever false (another scipy), the labels are renumbered
explicitly, so the contract does not rest on scipy's internals.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .graph import GraphStore

CHUNK = 1 << 20  # edges per connected_components call, and per searchsorted pass


def fragment_positions(fragment_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Positions (int64) of ``ids`` in the sorted ``fragment_ids``; -1 where an id is not there."""
    ids = np.asarray(ids).astype(fragment_ids.dtype, copy=False)
    position = np.searchsorted(fragment_ids, ids)
    inside = position < len(fragment_ids)
    found = np.zeros(len(ids), dtype=bool)
    found[inside] = fragment_ids[position[inside]] == ids[inside]
    position[~found] = -1
    return position


def edge_positions(fragment_ids: np.ndarray, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """u and v as positions in ``fragment_ids``, in the smallest integer type that holds them.

    Raises RuntimeError when an edge names a fragment the graph does not hold (a block
    whose fragments were replaced but not its edges); merging would silently drop it."""
    index_type = np.int32 if len(fragment_ids) < 2**31 else np.int64
    iu = np.empty(len(u), dtype=index_type)
    iv = np.empty(len(v), dtype=index_type)
    unknown = 0
    for start in range(0, len(u), CHUNK):
        part = slice(start, start + CHUNK)
        pu = fragment_positions(fragment_ids, u[part])
        pv = fragment_positions(fragment_ids, v[part])
        unknown += int(np.count_nonzero((pu < 0) | (pv < 0)))
        iu[part], iv[part] = pu, pv
    if unknown:
        raise RuntimeError(f"{unknown} edges name fragments the graph does not hold")
    return iu, iv


def first_appearance(labels: np.ndarray) -> bool:
    """Whether labels 0, 1, 2, ... first appear in that order (and nothing is skipped)."""
    if not len(labels):
        return True
    running = np.maximum.accumulate(labels)
    return labels[0] == 0 and bool(np.all(np.diff(running) <= 1))


def renumber(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 0, 1, ... in the order of first appearance (the fallback)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.empty(len(first), dtype=labels.dtype)
    order[np.argsort(first, kind="stable")] = np.arange(len(first), dtype=labels.dtype)
    return order[inverse.ravel()]


def _join(labels: np.ndarray, count: int, iu: np.ndarray, iv: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels after adding edges (iu, iv) to a graph already contracted to ``count`` components."""
    a, b = labels[iu], labels[iv]
    crossing = a != b
    if not crossing.any():
        return labels, count
    a, b = a[crossing], b[crossing]
    matrix = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(count, count))
    count, joined = connected_components(matrix, directed=False)
    return joined.astype(labels.dtype, copy=False)[labels], int(count)


def sweep(fragment_ids: np.ndarray, u: np.ndarray, v: np.ndarray, scores: np.ndarray,
          thresholds: Sequence[float]) -> Iterator[tuple[float, np.ndarray]]:
    """(threshold, segment ids as uint64 from 1) for each distinct threshold, increasing.

    ``fragment_ids`` sorted and unique; an edge merges at t when ``score <= t`` (so +inf
    and NaN never merge); self edges and repeated edges are harmless. One table is held at
    a time, so a caller that writes each before asking for the next holds one."""
    levels = np.array(sorted({float(t) for t in thresholds}), dtype=np.float64)
    n = len(fragment_ids)
    iu, iv = edge_positions(fragment_ids, u, v)
    # bucket k: first threshold admitting the edge; len(levels) for never (inf, NaN, above all)
    bucket = np.empty(len(scores), dtype=np.int8 if len(levels) < 127 else np.int32)
    for first in range(0, len(scores), CHUNK):
        part = scores[first:first + CHUNK]
        bucket[first:first + CHUNK] = np.where(np.isnan(part), len(levels),
                                               np.searchsorted(levels, part, side="left"))
    labels = np.arange(n, dtype=iu.dtype)
    count = n
    for k, threshold in enumerate(levels):
        admitted = np.flatnonzero(bucket == k)
        for chunk in range(0, len(admitted), CHUNK):
            take = admitted[chunk:chunk + CHUNK]
            labels, count = _join(labels, count, iu[take], iv[take])
        del admitted
        if not first_appearance(labels):
            labels = renumber(labels)
        yield float(threshold), labels.astype(np.uint64) + np.uint64(1)


def segments_at(fragment_ids: np.ndarray, u: np.ndarray, v: np.ndarray, scores: np.ndarray,
                threshold: float) -> np.ndarray:
    """Segment id (uint64, from 1) of each fragment in ``fragment_ids`` (sorted), at one threshold."""
    ((_, segments),) = sweep(fragment_ids, u, v, scores, [threshold])
    return segments


def write_lookup_tables(graph: GraphStore, thresholds: Sequence[float]) -> dict[float, int]:
    """Compute and store the table for each threshold; returns segment counts (increasing t)."""
    fragment_ids = graph.fragment_ids()
    u, v, scores = graph.edges()
    counts = {}
    for threshold, segments in sweep(fragment_ids, u, v, scores, thresholds):
        graph.write_lookup(threshold, fragment_ids, segments)
        counts[threshold] = int(segments.max()) if len(segments) else 0
    return counts
