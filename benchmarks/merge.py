"""The global merge at scale: read the region graph, merge at nine thresholds, write the
lookup tables, relabel a block; time and memory of each, for synthetic graphs of 10^5,
10^6 and 10^7 edges.

    python benchmarks/merge.py --sizes 1e5 1e6 1e7
    python benchmarks/merge.py --sizes 1e5 1e6 --graph postgresql://user@localhost:5432/psc
    python benchmarks/merge.py --scheduler 1e5          # daisy's scheduler memory at many blocks

The graphs: fragments on a 3D grid (each touches its 6 face neighbours, and a quarter of
its 12 in-plane diagonal neighbours, so ~4.5 edges per fragment, ~9 per fragment's
neighbourhood), ids made the way ``fragments.globalise`` makes them (block index in the
high 32 bits, 16^3 fragments a block), scores uniform in [0, 1) and 5 % never merged
(+inf, NULL in the store), each edge written by its lower fragment's block through the
store's own ``write_fragments``/``write_edges``. A store is built once per size and kept
in ``--scratch`` (building is not timed).

Each size runs in its own process (``--child``), so the peak resident memory
(``getrusage`` ``ru_maxrss``) is that size's alone; the merge's own peak is also
measured with ``tracemalloc`` (numpy reports its buffers to it) above what was held
before, to compare with the edge arrays it was given (u, v, score: 24 B an edge).

``old_merge`` below is a copy of the merge as it was before issue 16 (``np.isin`` check,
one sparse matrix and ``connected_components`` over every admitted edge per threshold),
kept only as the reference for the side-by-side columns; it is not used by the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from psc.pipelines.em import layout
from psc.pipelines.em.fragments import ID_BITS
from psc.pipelines.em.graph import GraphStore, apply_lookup
from psc.pipelines.em.merge import sweep, write_lookup_tables

BLOCK = 16  # fragments per block along each axis
RELABEL_BLOCK = 128  # voxels per side of the relabelled block (the pipeline's default block)


# --- the reference: the merge before issue 16, unchanged except for its name -------------

def old_segments_at(fragment_ids, u, v, scores, threshold):
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(fragment_ids)
    keep = scores <= threshold
    rows = np.searchsorted(fragment_ids, u[keep])
    cols = np.searchsorted(fragment_ids, v[keep])
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    _, first = np.unique(labels, return_index=True)
    order = np.empty(len(first), dtype=np.uint64)
    order[np.argsort(first)] = np.arange(1, len(first) + 1, dtype=np.uint64)
    return order[labels]


def old_merge(fragment_ids, u, v, scores, thresholds):
    """The old ``write_lookup_tables`` without the writes: yields (threshold, segments)."""
    unknown = ~np.isin(u, fragment_ids) | ~np.isin(v, fragment_ids)
    if unknown.any():
        raise RuntimeError(f"{int(unknown.sum())} edges name fragments the graph does not hold")
    for threshold in sorted(thresholds):
        yield float(threshold), old_segments_at(fragment_ids, u, v, scores, threshold)


# --- synthetic region graphs ---------------------------------------------------------------

def grid_shape(edges: int) -> tuple[int, int, int]:
    """A grid of fragments with about ``edges`` edges: whole blocks along z and y, the
    last axis stretched to land near the target (its last block may be partial)."""
    per_fragment = 3 + 0.25 * 6  # 3 face edges + a quarter of 6 in-plane diagonals, per fragment
    side = (edges / per_fragment) ** (1 / 3)
    blocks = max(1, round(side / BLOCK))
    z = blocks * BLOCK
    x = max(1, round(edges / per_fragment / (z * z)))
    return z, z, x


def fragment_id(coords: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Global id of the fragment at grid coordinates (n, 3), as ``globalise`` numbers them."""
    blocks = -(-np.array(shape) // BLOCK)
    b = coords // BLOCK
    block = (b[:, 0] * blocks[1] + b[:, 1]) * blocks[2] + b[:, 2]
    local = coords % BLOCK
    within = (local[:, 0] * BLOCK + local[:, 1]) * BLOCK + local[:, 2]
    return (block.astype(np.uint64) << np.uint64(ID_BITS)) + within.astype(np.uint64) + np.uint64(1)


def synthetic_graph(edges: int, seed: int = 0):
    """(fragment ids, blocks of them, u, v, affinity, merge score with NaN for never)."""
    rng = np.random.default_rng(seed)
    shape = grid_shape(edges)
    coords = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    ids = fragment_id(coords, shape)
    steps = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    diagonals = [(1, 1, 0), (1, -1, 0), (1, 0, 1), (1, 0, -1), (0, 1, 1), (0, 1, -1)]
    us, vs = [], []
    for step in steps + diagonals:
        other = coords + np.array(step)
        inside = np.all((other >= 0) & (other < np.array(shape)), axis=1)
        if step in diagonals:
            inside &= rng.random(len(coords)) < 0.25
        a, b = ids[inside], fragment_id(other[inside], shape)
        us.append(np.minimum(a, b))
        vs.append(np.maximum(a, b))
    u, v = np.concatenate(us), np.concatenate(vs)
    affinity = rng.random(len(u))
    score = rng.random(len(u))
    score[rng.random(len(u)) < 0.05] = np.nan  # never merged: NULL in the store, +inf read back
    return np.sort(ids), u, v, affinity, score


def build_store(graph, edges: int, seed: int = 0) -> dict:
    """Write a synthetic graph through the store's own per-block writes."""
    ids, u, v, affinity, score = synthetic_graph(edges, seed)
    fragment_block = (ids >> np.uint64(ID_BITS)).astype(np.int64)
    edge_block = (u >> np.uint64(ID_BITS)).astype(np.int64)
    order = np.argsort(edge_block, kind="stable")
    u, v, affinity, score, edge_block = u[order], v[order], affinity[order], score[order], edge_block[order]
    sizes = np.full(len(ids), 1000, dtype=np.int64)
    f_ends = np.searchsorted(fragment_block, np.arange(fragment_block.max() + 2))
    e_ends = np.searchsorted(edge_block, np.arange(fragment_block.max() + 2))
    for block in range(int(fragment_block.max()) + 1):
        fs = slice(f_ends[block], f_ends[block + 1])
        graph.write_fragments(block, ids[fs], sizes[fs])
        es = slice(e_ends[block], e_ends[block + 1])
        scores = [None if np.isnan(m) else m for m in score[es].tolist()]
        graph.write_edges(block, zip(u[es].tolist(), v[es].tolist(), affinity[es].tolist(), scores))
    return {"fragments": len(ids), "edges": len(u), "blocks": int(fragment_block.max()) + 1}


# --- one size, in its own process ----------------------------------------------------------

def open_store(url: str | None, path: Path):
    """SQLite at ``path`` by default; a PostgreSQL URL gets a schema per size and seed,
    named after ``path`` (so each size is built once and kept, as the SQLite files are)."""
    if url is None:
        return GraphStore(path)
    from psc.pipelines.em import graph_url

    parsed = graph_url.parse(url)
    if parsed.kind == "postgresql":
        schema = "psc_bench_" + path.stem.replace("-", "_").replace(".", "_")
        url = graph_url.with_schema(parsed, schema).text
    return graph_url.open_graph(url, str(path.parent))


def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def merge_peak(fn) -> tuple[float, int]:
    """(seconds, tracemalloc peak bytes above the start) of ``fn()``."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return seconds, peak


def relabel_block(ids: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """A 128^3 block of fragments as the relabel stage reads it: the first block's
    fragments, each a cube of 8^3 voxels, ids from the graph (tiled when fewer)."""
    side = RELABEL_BLOCK // 8
    coords = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    coords = coords % np.array([min(side, s) for s in shape])
    labels = fragment_id(coords, shape).reshape(side, side, side)
    return np.repeat(np.repeat(np.repeat(labels, 8, 0), 8, 1), 8, 2)


def build(edges: int, path: Path, url: str | None, seed: int) -> dict:
    """Fill an empty store with the synthetic graph of ``edges`` edges (not timed in the table)."""
    graph = open_store(url, path)
    try:
        if graph.fragment_ids().size:
            return {"built": False}
        start = time.perf_counter()
        made = build_store(graph, edges, seed)
        return {"built": True, "build_s": time.perf_counter() - start, **made}
    finally:
        graph.close()


def child(edges: int, path: Path, url: str | None, run_old: bool, seed: int) -> dict:
    thresholds = layout.DEFAULT_THRESHOLDS
    graph = open_store(url, path)
    row: dict = {"size": edges, "backend": "sqlite" if url is None else url.split(":", 1)[0],
                 "rss_start_mb": rss_mb()}  # imports (numpy, scipy, psc), before any graph
    try:
        rss_before = rss_mb()
        start = time.perf_counter()
        fragment_ids = graph.fragment_ids()
        u, v, scores = graph.edges()
        row["read_s"] = time.perf_counter() - start
        row["rss_after_read_mb"] = rss_mb() - rss_before
        row.update(fragments=len(fragment_ids), edges=len(u), edge_array_mb=(u.nbytes + v.nbytes + scores.nbytes) / 2**20)
        if not 0.7 * edges < len(u) < 1.3 * edges:
            raise SystemExit(f"the graph holds {len(u)} edges, not about {edges}: give each size an empty database")

        start = time.perf_counter()
        counts = {t: int(s.max()) for t, s in sweep(fragment_ids, u, v, scores, thresholds)}
        row["merge_s"] = time.perf_counter() - start
        _, peak = merge_peak(lambda: [None for _ in sweep(fragment_ids, u, v, scores, thresholds)])
        row["merge_peak_mb"] = peak / 2**20
        row["segments"] = [counts[t] for t in sorted(counts)]

        if run_old:
            start = time.perf_counter()
            old = dict(old_merge(fragment_ids, u, v, scores, thresholds))
            row["old_merge_s"] = time.perf_counter() - start
            row["old_same"] = all(np.array_equal(old[t], s) for t, s in sweep(fragment_ids, u, v, scores, thresholds))
            del old
            _, peak = merge_peak(lambda: [None for _ in old_merge(fragment_ids, u, v, scores, thresholds)])
            row["old_merge_peak_mb"] = peak / 2**20
        del u, v, scores

        written = []
        original = graph.write_lookup

        def timed_write(*args):
            start = time.perf_counter()
            original(*args)
            written.append(time.perf_counter() - start)

        graph.write_lookup = timed_write
        write_lookup_tables(graph, thresholds)
        graph.write_lookup = original
        row["write_s"] = sum(written)

        row["peak_rss_merge_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        ids, segments = graph.lookup(0.5)
        row["lookup_read_s"] = time.perf_counter() - start
        block = relabel_block(ids, grid_shape(edges))
        start = time.perf_counter()
        relabelled = apply_lookup(block, ids, segments)
        row["apply_s"] = time.perf_counter() - start
        row["relabel_unknown"] = int(np.count_nonzero(relabelled == 0))
    finally:
        graph.close()
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


# --- the scheduler at many blocks ----------------------------------------------------------

def scheduler_memory(blocks: int) -> dict:
    """daisy's scheduler over one task of about ``blocks`` blocks, made as ``run._task``
    makes a stage's (context around each block, ``fit="shrink"``, tracking in a folder),
    driven to the end in this process with no worker (``acquire_block``/``release_block``,
    what the server does for each request): the memory to hold the task's blocks and hand
    every one out. Not measured: the TCP server and the worker processes."""
    import shutil

    import daisy
    from funlib.geometry import Roi

    rss_before = rss_mb()
    side = max(1, round(blocks ** (1 / 3)))
    shape = (side, side, max(1, round(blocks / side**2)))
    block, context = 8, 2
    tracking = Path(tempfile.mkdtemp(prefix="psc-scheduler-bench-"))
    try:
        start = time.perf_counter()
        task = daisy.Task("bench", total_roi=Roi((0, 0, 0), tuple(s * block for s in shape)).grow((context,) * 3, (context,) * 3),
                          read_roi=Roi((0, 0, 0), (block + 2 * context,) * 3), write_roi=Roi((context,) * 3, (block,) * 3),
                          process_function=lambda b: None, read_write_conflict=False, fit="shrink",
                          max_retries=0, tracking_path=str(tracking))
        scheduler = daisy.Scheduler(task)
        made_s, rss_made = time.perf_counter() - start, rss_mb() - rss_before
        handed = 0
        while (got := scheduler.acquire_block("bench")) is not None:
            got.status = daisy.BlockStatus.SUCCESS
            scheduler.release_block(got)
            handed += 1
        seconds = time.perf_counter() - start
    finally:
        shutil.rmtree(tracking, ignore_errors=True)
    return {"blocks": int(np.prod(shape)), "handed": handed, "made_s": made_s, "seconds": seconds,
            "rss_made_mb": rss_made, "rss_end_mb": rss_mb() - rss_before, "rss_start_mb": rss_before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


# --- the table ------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    head = ("| backend | edges | fragments | read s | merge s | old merge s | write s | lookup read s "
            "| apply 128^3 s | merge peak MB (edge arrays MB) | old merge peak MB | peak RSS MB to write (at start) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        old = f"{r['old_merge_s']:.2f}" if "old_merge_s" in r else "-"
        old_peak = f"{r['old_merge_peak_mb']:.0f}" if "old_merge_peak_mb" in r else "-"
        lines.append(
            f"| {r['backend']} | {r['edges']:,} | {r['fragments']:,} | {r['read_s']:.2f} | {r['merge_s']:.2f} "
            f"| {old} | {r['write_s']:.2f} | {r['lookup_read_s']:.2f} | {r['apply_s']:.3f} "
            f"| {r['merge_peak_mb']:.0f} ({r['edge_array_mb']:.0f}) | {old_peak} | {r['peak_rss_merge_mb']:.0f} ({r['rss_start_mb']:.0f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", type=float, default=[1e5, 1e6, 1e7], help="edges per graph")
    parser.add_argument("--graph", help="a graph URL (postgresql://...) instead of SQLite files in --scratch; "
                                        "needs graph.open_graph; each size uses the URL's database as it is")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "psc-merge-bench",
                        help="where the SQLite stores are built and kept between runs")
    parser.add_argument("--old-max", type=float, default=1e7, help="largest size the old merge runs at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scheduler", type=float, nargs="*", help="measure daisy's scheduler at these block counts")
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child is not None:
        edges = int(args.child)
        path = args.scratch / f"graph-{edges}-seed{args.seed}.db"
        if args.build:
            print(json.dumps(build(edges, path, args.graph, args.seed)))
        else:
            print(json.dumps(child(edges, path, args.graph, edges <= args.old_max, args.seed)))
        return
    from machine import machine_line

    print(machine_line())
    if args.scheduler:
        for blocks in args.scheduler:
            out = subprocess.run([sys.executable, "-c", f"import json, merge; print(json.dumps(merge.scheduler_memory({int(blocks)})))"],
                                 cwd=Path(__file__).parent, capture_output=True, text=True, check=True)
            print(out.stdout.strip())
        return
    args.scratch.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        command = [sys.executable, __file__, "--child", str(size), "--scratch", str(args.scratch),
                   "--old-max", str(args.old_max), "--seed", str(args.seed)]
        if args.graph:
            command += ["--graph", args.graph]
        for step in (["--build"], []):
            out = subprocess.run(command + step, capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            if step:
                print("build", out.stdout.strip(), flush=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    print(table(rows))


if __name__ == "__main__":
    main()
