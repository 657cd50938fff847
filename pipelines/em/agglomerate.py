"""Region-graph edges of one block, scored by waterz's hierarchical agglomeration.

waterz merges the block's fragments (seen with context) in order of
``1 - mean affinity`` of their contact (Funke et al. 2018, IEEE TPAMI 41:1669), recording
every merge. Each original edge gets the *merge score* at which its two fragments first
ended up in one region; connected components of the edges with merge score <= t then
reproduce waterz's segmentation at threshold t, and the global merge does exactly that
over the edges of all blocks.
"""

from __future__ import annotations

import numpy as np
import waterz

from ..silence import silenced

SCORING = "OneMinus<MeanAffinity<RegionGraphType, ScoreValue>>"
# the alternative measured in docs/results-em.md: a quantile of the contact's affinity
# histogram (robust to a few strong affinities across a thin membrane gap)
QUANTILE_SCORING = "OneMinus<HistogramQuantileAffinity<RegionGraphType, {q}, ScoreValue, 256>>"


class _Clusters:
    """Union-find over fragments that also finds, at each merge, the original edges
    joining the two clusters (scanning the smaller side's open edges)."""

    def __init__(self, edges: list[tuple[int, int]]) -> None:
        self.parent: dict[int, int] = {}
        self.open: dict[int, list[int]] = {}
        self.edges = edges
        for index, (u, v) in enumerate(edges):
            for node in (u, v):
                self.parent.setdefault(node, node)
                self.open.setdefault(node, []).append(index)

    def find(self, node: int) -> int:
        root = node
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[node] != root:
            self.parent[node], node = root, self.parent[node]
        return root

    def union(self, a: int, b: int) -> tuple[int, list[int]]:
        """Merge the clusters of a and b; returns the root and the edges that closed."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra, []
        small, large = sorted((ra, rb), key=lambda r: len(self.open.get(r, ())))
        self.parent[small] = large
        closed, still_open = [], []
        for index in self.open.pop(small, []):
            u, v = self.edges[index]
            (closed if self.find(u) == self.find(v) else still_open).append(index)
        closed_set = set(closed)
        self.open[large] = [i for i in self.open.get(large, []) if i not in closed_set] + still_open
        return large, closed


def score_edges(affinities: np.ndarray, fragments: np.ndarray,
                scoring: str = SCORING) -> list[tuple[int, int, float, float | None]]:
    """All edges between fragments in the block, as (u, v, affinity score, merge score).

    ``affinities`` float32 (3, z, y, x); ``fragments`` uint64 global ids. Scores are
    ``1 - mean affinity`` (0 = certainly one object); an edge never merged below 1 has
    merge score None.
    """
    ids, inverse = np.unique(fragments, return_inverse=True)
    local = (inverse.reshape(fragments.shape) + 1).astype(np.uint64)  # waterz sizes arrays by max id
    results = waterz.agglomerate(
        np.ascontiguousarray(affinities, dtype=np.float32),
        thresholds=[-1.0, 1.0],  # -1: the untouched region graph first
        fragments=local.copy(),  # waterz relabels the array in place
        scoring_function=scoring,
        return_merge_history=True,
        return_region_graph=True,
    )
    merges = []
    region_graph = None
    with silenced(1):  # waterz's C++ core reports progress on stdout
        for _, history, graph in results:
            region_graph = graph if region_graph is None else region_graph
            merges += history
    edges = [(int(e["u"]), int(e["v"])) for e in region_graph]
    initial = [float(e["score"]) for e in region_graph]
    merge_score: list[float | None] = [None] * len(edges)
    clusters = _Clusters(edges)
    alias: dict[int, int] = {}  # waterz region id -> a fragment inside it
    for merge in merges:
        a = alias.get(int(merge["a"]), int(merge["a"]))
        b = alias.get(int(merge["b"]), int(merge["b"]))
        if a not in clusters.parent or b not in clusters.parent:
            continue
        _, closed = clusters.union(a, b)
        for index in closed:
            merge_score[index] = float(merge["score"])
        alias[int(merge["c"])] = a
    return [
        (int(ids[u - 1]), int(ids[v - 1]), s, m)
        for (u, v), s, m in zip(edges, initial, merge_score)
    ]
