"""Global merge: one fragment -> segment lookup table per threshold.

Connected components of the edges whose merge score is <= t (scipy's sparse graph
routine) over all fragments of the volume; segment ids are consecutive from 1 in the
order of the lowest fragment id, so they do not depend on worker timing. Fragments with
no edge are segments of their own. Tables go to the graph store, which is what makes the
napari threshold slider free: changing t only swaps the table.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .graph import GraphStore


def segments_at(fragment_ids: np.ndarray, u: np.ndarray, v: np.ndarray, scores: np.ndarray,
                threshold: float) -> np.ndarray:
    """Segment id (uint64, from 1) of each fragment in ``fragment_ids`` (sorted)."""
    n = len(fragment_ids)
    keep = scores <= threshold
    rows = np.searchsorted(fragment_ids, u[keep])
    cols = np.searchsorted(fragment_ids, v[keep])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # renumber by first appearance, which follows the sorted fragment ids
    _, first = np.unique(labels, return_index=True)
    order = np.empty(len(first), dtype=np.uint64)
    order[np.argsort(first)] = np.arange(1, len(first) + 1, dtype=np.uint64)
    return order[labels]


def write_lookup_tables(graph: GraphStore, thresholds: Sequence[float]) -> dict[float, int]:
    """Compute and store the table for each threshold; returns segment counts."""
    fragment_ids = graph.fragment_ids()
    u, v, scores = graph.edges()
    unknown = ~np.isin(u, fragment_ids) | ~np.isin(v, fragment_ids)
    if unknown.any():
        raise RuntimeError(f"{int(unknown.sum())} edges name fragments the graph does not hold")
    counts = {}
    for threshold in sorted(thresholds):
        segments = segments_at(fragment_ids, u, v, scores, threshold)
        graph.write_lookup(float(threshold), fragment_ids, segments)
        counts[float(threshold)] = int(segments.max()) if len(segments) else 0
    return counts
