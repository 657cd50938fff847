"""The global merge (pipelines/em/merge.py) against references written here: a plain
Python union-find and scipy's connected components per threshold, each renumbered by the
lowest fragment id. The merge sweeps the thresholds incrementally and in chunks, so these
tests shrink the chunk to make every graph cross several chunks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from psc.pipelines.em import merge
from psc.pipelines.em.fragments import ID_BITS
from psc.pipelines.em.graph import GraphStore
from psc.pipelines.em.merge import first_appearance, renumber, segments_at, sweep, write_lookup_tables


def union_find_reference(ids, u, v, scores, threshold):
    """Segment ids from 1 in the order of the lowest fragment id, by a dict union-find."""
    parent = {int(i): int(i) for i in ids}

    def root(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b, s in zip(u.tolist(), v.tolist(), scores.tolist()):
        if s <= threshold:  # False for NaN and for +inf below an infinite threshold
            ra, rb = root(a), root(b)
            parent[max(ra, rb)] = min(ra, rb)
    numbers: dict[int, int] = {}
    return np.array([numbers.setdefault(root(int(i)), len(numbers) + 1) for i in ids], dtype=np.uint64)


def scipy_reference(ids, u, v, scores, threshold):
    """All admitted edges in one matrix, as the merge did before issue 16."""
    keep = scores <= threshold
    rows, cols = np.searchsorted(ids, u[keep]), np.searchsorted(ids, v[keep])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(ids), len(ids)))
    _, labels = connected_components(graph, directed=False)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.uint64)
    rank[np.argsort(first)] = np.arange(1, len(first) + 1, dtype=np.uint64)
    return rank[inverse]


def random_graph(rng, fragments, edges):
    """Ids as globalise makes them (block in the high bits), some fragments without any
    edge, +inf and NaN scores, self edges, repeats and reversed repeats."""
    blocks = rng.integers(0, 2**20, fragments).astype(np.uint64) << np.uint64(ID_BITS)
    ids = np.unique(blocks + rng.integers(1, 2**31, fragments).astype(np.uint64))
    touched = ids[rng.random(len(ids)) < 0.8]  # the rest stay isolated
    if not len(touched):
        touched = ids
    u = touched[rng.integers(0, len(touched), edges)]
    v = touched[rng.integers(0, len(touched), edges)]
    scores = rng.random(edges).round(2)  # ties with the thresholds themselves
    scores[rng.random(edges) < 0.1] = np.inf
    scores[rng.random(edges) < 0.03] = np.nan
    repeat = rng.random(edges) < 0.1
    selves = touched[:3]
    return (ids, np.concatenate([u, v[repeat], selves]),  # reversed repeats, then self edges
            np.concatenate([v, u[repeat], selves]),
            np.concatenate([scores, rng.random(int(repeat.sum())), [0.0, 0.5, np.inf][:len(selves)]]))


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(merge, "CHUNK", 7)


@pytest.mark.parametrize("seed", range(12))
def test_sweep_equals_references(seed, small_chunks):
    rng = np.random.default_rng(seed)
    ids, u, v, scores = random_graph(rng, int(rng.integers(1, 120)), int(rng.integers(0, 300)))
    thresholds = [0.7, 0.1, 0.5, 0.3, 0.5, 0.9, 0.2]  # unsorted, one repeated
    got = list(sweep(ids, u, v, scores, thresholds))
    assert [t for t, _ in got] == sorted(set(thresholds))
    for threshold, segments in got:
        assert segments.dtype == np.uint64
        assert np.array_equal(segments, union_find_reference(ids, u, v, scores, threshold)), threshold
        assert np.array_equal(segments, scipy_reference(ids, u, v, scores, threshold)), threshold


def test_segments_at_one_threshold_and_infinite_scores(small_chunks):
    ids = np.array([3, 5, 8, 13, 21], dtype=np.uint64)
    u = np.array([3, 8, 21, 13], dtype=np.uint64)
    v = np.array([13, 5, 8, 3], dtype=np.uint64)
    scores = np.array([0.2, np.inf, 0.6, 0.2])
    assert segments_at(ids, u, v, scores, 0.5).tolist() == [1, 2, 3, 1, 4]
    assert segments_at(ids, u, v, scores, 0.6).tolist() == [1, 2, 3, 1, 3]
    assert segments_at(ids, u, v, scores, 1e9).tolist() == [1, 2, 3, 1, 3]  # inf never merges
    assert segments_at(ids, u[:0], v[:0], scores[:0], 0.5).tolist() == [1, 2, 3, 4, 5]


def test_unknown_fragments_are_refused():
    ids = np.array([1, 2, 4], dtype=np.uint64)
    u = np.array([1, 2, 4, 9], dtype=np.uint64)  # 9: beyond every id
    v = np.array([2, 3, 1, 1], dtype=np.uint64)  # 3: between ids
    with pytest.raises(RuntimeError, match="^2 edges name fragments the graph does not hold"):
        list(sweep(ids, u, v, np.zeros(4), [0.5]))
    with pytest.raises(RuntimeError, match="1 edges"):
        list(sweep(ids[:0], u[:1], v[:1], np.zeros(1), [0.5]))  # no fragments at all


def test_renumbering_does_not_rest_on_scipy_order(monkeypatch, small_chunks):
    """Were connected_components to number components in another order, the tables would
    still be numbered by the lowest fragment id."""

    def reversed_components(matrix, directed):
        count, labels = connected_components(matrix, directed=directed)
        return count, (count - 1 - labels).astype(labels.dtype)

    rng = np.random.default_rng(5)
    ids, u, v, scores = random_graph(rng, 80, 200)
    monkeypatch.setattr(merge, "connected_components", reversed_components)
    for threshold, segments in sweep(ids, u, v, scores, [0.2, 0.6]):
        assert np.array_equal(segments, union_find_reference(ids, u, v, scores, threshold))
    labels = np.array([2, 2, 0, 1, 0, 3])
    assert not first_appearance(labels) and renumber(labels).tolist() == [0, 0, 1, 2, 1, 3]
    assert first_appearance(renumber(labels)) and first_appearance(np.array([], dtype=np.int32))


def store_with(path, ids, u, v, scores):
    """A graph store holding the graph, each edge in its lower fragment's block."""
    graph = GraphStore(path)
    blocks = ids >> np.uint64(ID_BITS)
    for block in np.unique(blocks):
        mine = blocks == block
        graph.write_fragments(int(block), ids[mine], np.ones(int(mine.sum()), dtype=np.int64))
        low = np.minimum(u, v) >> np.uint64(ID_BITS) == block
        graph.write_edges(int(block), [(a, b, 0.5, None if not np.isfinite(s) else s)
                                       for a, b, s in zip(u[low].tolist(), v[low].tolist(), scores[low].tolist())])
    return graph


def test_write_lookup_tables_through_the_store(tmp_path, small_chunks, monkeypatch):
    from psc.pipelines.em import graph as graph_module

    monkeypatch.setattr(graph_module, "LOOKUP_PART", 16)  # each table stored in several parts
    rng = np.random.default_rng(11)
    ids, u, v, scores = random_graph(rng, 150, 400)
    # the store's primary key holds each (u, v) once; reversed pairs and self edges it can hold
    _, first = np.unique(np.stack([u, v], 1), axis=0, return_index=True)
    first = np.sort(first)
    u, v, scores = u[first], v[first], scores[first]
    graph = store_with(tmp_path / "graph.sqlite", ids, u, v, scores)
    try:
        counts = write_lookup_tables(graph, [0.8, 0.2, 0.5])
        assert list(counts) == [0.2, 0.5, 0.8] and graph.thresholds() == [0.2, 0.5, 0.8]
        for threshold in (0.2, 0.5, 0.8):
            fragments, segments = graph.lookup(threshold)
            expected = union_find_reference(ids, u, v, scores, threshold)
            assert np.array_equal(fragments, ids) and np.array_equal(segments, expected)
            assert counts[threshold] == int(expected.max())
        assert counts[0.2] > counts[0.5] > counts[0.8]
        parts = graph.connection.execute("SELECT COUNT(*) FROM lookup_parts WHERE threshold = 0.5").fetchone()[0]
        assert parts == -(-len(ids) // 16)
        write_lookup_tables(graph, [0.5])  # a rerun replaces the table with the same one
        assert np.array_equal(graph.lookup(0.5)[1], union_find_reference(ids, u, v, scores, 0.5))
    finally:
        graph.close()


def test_store_with_edges_to_unknown_fragments_writes_nothing(tmp_path):
    ids = np.array([1, 2, 3], dtype=np.uint64)
    graph = store_with(tmp_path / "graph.sqlite", ids, ids[:2], ids[1:], np.array([0.1, 0.2]))
    try:
        graph.write_fragments(0, ids[:2], np.ones(2, dtype=np.int64))  # block 0 re-run without fragment 3
        with pytest.raises(RuntimeError, match="1 edges name fragments"):
            write_lookup_tables(graph, [0.5])
        assert graph.thresholds() == []
    finally:
        graph.close()
