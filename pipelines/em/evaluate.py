"""Scoring an EM run against ground truth, blockwise and for every threshold at once.

The table that matters is fragments x ground truth: a segmentation at threshold t only
renames fragments, so its table is that one with the fragment ids passed through the
lookup table of t and equal pairs summed. One pass over the volume (block by block, so
memory is bounded by the block size) scores every stored threshold.
"""

from __future__ import annotations

from tqdm import tqdm

from psc.utils.errors import InputError
from . import layout
from .blocks import blocks
from .graph import apply_lookup
from .graph_url import open_run_graph
from .metrics import Contingency, contingency_of, scores, sum_pairs
from .volumes import Volume, open_volume


def contingency(labels: Volume, gt: Volume, progress: bool = True) -> Contingency:
    """The table of ``labels`` against ``gt``, read a chunk-aligned block at a time."""
    if labels.shape != gt.shape:
        raise InputError(f"segmentation {labels.shape} and ground truth {gt.shape} differ in shape")
    parts = [(Ellipsis, *block) for block in blocks(labels.shape, labels.array.chunks[-3:])]
    with tqdm(total=len(parts), desc="scoring", disable=not progress, leave=False) as bar:
        return contingency_of(labels.array, gt.array, parts, lambda done, total: bar.update(1))


def evaluate_volume(segmentation: str, gt: str, progress: bool = True) -> dict[str, float]:
    """Scores of one segmentation volume (e.g. a run's ``segmentation``, or a baseline)."""
    return scores(contingency(open_volume(segmentation), open_volume(gt), progress))


def evaluate_run(out: str, gt: str, progress: bool = True) -> dict[float, dict[str, float]]:
    """Scores of the run in ``out`` at every threshold it stored."""
    fragments = open_volume(out, layout.FRAGMENTS)
    frag_ids, gt_ids, counts = contingency(fragments, open_volume(gt), progress).to_arrays()
    graph = open_run_graph(out)  # its recorded graph URL: SQLite or PostgreSQL
    try:
        results = {}
        for threshold in graph.thresholds():
            ids, segments = graph.lookup(threshold)
            seg_ids = apply_lookup(frag_ids, ids, segments)
            results[threshold] = scores(sum_pairs(seg_ids, gt_ids, counts))
    finally:
        graph.close()
    if not results:
        raise InputError(f"{out}: the run has no lookup tables yet (it did not finish)")
    return results


def format_table(results: dict[float, dict[str, float]]) -> str:
    keys = ("voi_split", "voi_merge", "voi", "rand_split", "rand_merge", "adapted_rand_error")
    best = min(results, key=lambda t: results[t]["voi"])
    names = ("VI split", "VI merge", "VI", "Rand split", "Rand merge", "ARAND")
    lines = ["threshold  " + "  ".join(f"{k:>10}" for k in names)]
    for threshold, row in sorted(results.items()):
        mark = "  <- lowest VI" if threshold == best else ""
        lines.append(f"{threshold:>9g}  " + "  ".join(f"{row[k]:>10.4f}" for k in keys) + mark)
    return "\n".join(lines)
