"""Scoring an EM run against ground truth, blockwise and for every threshold at once.

The table that matters is fragments x ground truth: a segmentation at threshold t only
renames fragments, so its table is that one with the fragment ids passed through the
lookup table of t and equal pairs summed. One pass over the volume (block by block, so
memory is bounded by the block size) scores every stored threshold.
"""

from __future__ import annotations

from typing import Iterator

from funlib.geometry import Roi
from tqdm import tqdm

from psc.utils.errors import InputError
from . import layout
from .graph import GraphStore, apply_lookup
from .metrics import Contingency, sum_pairs, scores
from .volumes import Volume, open_volume


def blocks_of(volume: Volume, block_shape=None) -> Iterator[Roi]:
    """The volume's chunk-aligned blocks, in C order."""
    shape = block_shape or volume.array.chunks[-3:]
    for z in range(0, volume.shape[0], shape[0]):
        for y in range(0, volume.shape[1], shape[1]):
            for x in range(0, volume.shape[2], shape[2]):
                yield Roi((z, y, x), shape).intersect(volume.roi)


def contingency(labels: Volume, gt: Volume, progress: bool = True) -> Contingency:
    if labels.shape != gt.shape:
        raise InputError(f"segmentation {labels.shape} and ground truth {gt.shape} differ in shape")
    table = Contingency()
    rois = list(blocks_of(labels))
    for roi in tqdm(rois, desc="scoring", disable=not progress, leave=False):
        table.add(labels.read(roi), gt.read(roi))
    return table


def evaluate_volume(segmentation: str, gt: str, progress: bool = True) -> dict[str, float]:
    """Scores of one segmentation volume (e.g. a run's ``segmentation``, or a baseline)."""
    return scores(contingency(open_volume(segmentation), open_volume(gt), progress))


def evaluate_run(out: str, gt: str, progress: bool = True) -> dict[float, dict[str, float]]:
    """Scores of the run in ``out`` at every threshold it stored."""
    fragments = open_volume(out, layout.FRAGMENTS)
    frag_ids, gt_ids, counts = contingency(fragments, open_volume(gt), progress).to_arrays()
    graph = GraphStore(layout.graph_path(out))
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
