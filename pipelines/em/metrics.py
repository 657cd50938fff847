"""Neuron segmentation scores (variation of information, adapted Rand), blockwise.

A whole EM volume rarely fits in memory, but both scores depend on the volume only
through its contingency table: how many voxels carry each (segment, ground-truth
object) pair. That table is small (about as many entries as objects) and additive, so
each worker counts its own blocks, the tables are merged, and the scores are computed
once at the end, exactly as if the volume had been read in one piece.

Conventions follow waterz (``waterz.evaluate``) and CREMI, so numbers are comparable
with the literature:

- Ground-truth label 0 is the "unlabelled / boundary" label: voxels with gt == 0 are
  left out. Segmentation label 0 is an ordinary segment (a voxel the segmentation left
  unassigned still counts against it).
- Variation of information (Meila 2007, "Comparing clusterings - an information based
  distance", J. Multivariate Anal. 98(5)) in bits (log2), split in its two conditional
  entropies: ``voi_split = H(seg|gt)`` grows with false splits (oversegmentation),
  ``voi_merge = H(gt|seg)`` with false merges (undersegmentation).
- Rand scores as in Arganda-Carreras et al. 2015 ("Crowdsourcing the creation of image
  segmentation algorithms for connectomics", Front. Neuroanat. 9:142), with squared
  counts like CREMI and waterz: ``rand_split`` is the Rand recall (pairs of voxels in
  one gt object that the segmentation also keeps together; false splits lower it),
  ``rand_merge`` the Rand precision (pairs in one segment that also share a gt object;
  false merges lower it), and ``adapted_rand_error`` is 1 - their F-score. (scikit-image's
  ``adapted_rand_error`` counts pairs of distinct voxels, p_ij^2 - p_ij, instead: its
  value differs from this one by a term of the order of 1 / object size.)
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np

from psc.utils.errors import InputError

from .blocks import blocks, chunk_shape


def sum_pairs(seg: np.ndarray, gt: np.ndarray, counts: np.ndarray):
    """Sum ``counts`` over equal (seg, gt) pairs; the result is sorted by seg, then gt.

    Pairs are sorted with lexsort on the two id columns rather than folded into one
    integer key, which would overflow for uint64 ids.
    """
    if seg.size == 0:
        return seg, gt, counts
    order = np.lexsort((gt, seg))
    seg, gt, counts = seg[order], gt[order], counts[order]
    first = np.ones(seg.size, dtype=bool)
    first[1:] = (seg[1:] != seg[:-1]) | (gt[1:] != gt[:-1])
    starts = np.flatnonzero(first)
    return seg[starts], gt[starts], np.add.reduceat(counts, starts)


class Contingency:
    """Sparse contingency table of a segmentation against ground truth, built by blocks.

    ``add`` the blocks of one volume in any order, on any number of workers, and
    ``merge`` the workers' tables: the result is the table of the whole volume. Blocks
    must not overlap, or their shared voxels are counted twice.
    """

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, seg_block: np.ndarray, gt_block: np.ndarray) -> None:
        """Count the voxels of one block (integer labels of any dtype up to uint64)."""
        seg_block, gt_block = np.asarray(seg_block), np.asarray(gt_block)
        if seg_block.shape != gt_block.shape:
            raise InputError(f"segmentation block {seg_block.shape} and ground truth block "
                             f"{gt_block.shape} differ in shape")
        labelled = gt_block != 0
        seg = seg_block[labelled].astype(np.uint64, copy=False)
        gt = gt_block[labelled].astype(np.uint64, copy=False)
        self._parts.append(sum_pairs(seg, gt, np.ones(seg.size, dtype=np.uint64)))

    def merge(self, other: Contingency) -> None:
        """Add the counts of ``other`` (e.g. another worker's blocks) to this table."""
        self._parts.extend(other._parts)

    def to_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(seg_ids, gt_ids, counts)``: one uint64 entry per (segment, object) pair
        that shares at least one voxel, sorted by segment id, then gt id."""
        parts = self._parts or [(np.empty(0, np.uint64),) * 3]
        seg, gt, counts = (np.concatenate(column) for column in zip(*parts))
        self._parts = [sum_pairs(seg, gt, counts)]
        return self._parts[0]


def contingency_of(seg: Any, gt: Any, parts: Iterable[tuple[slice, ...] | slice] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> Contingency:
    """The ``Contingency`` of two label arrays of one shape (numpy, zarr or dask), counted
    a part at a time, so memory is bounded by a part: ``parts`` (index tuples or slices
    along axis 0), by default the blocks of ``seg``'s chunks (``psc.pipelines.em.blocks``).
    ``progress(done, total)`` after each part. psc-eval and the napari Score widget both
    count here."""
    if tuple(seg.shape) != tuple(gt.shape):
        raise InputError(f"segmentation {tuple(seg.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    parts = list(parts) if parts is not None else list(blocks(seg.shape, chunk_shape(seg, (32,))))
    table = Contingency()
    for done, part in enumerate(parts, 1):
        table.add(np.asarray(seg[part]), np.asarray(gt[part]))
        if progress is not None:
            progress(done, len(parts))
    return table


def _totals_by_id(ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """For each entry, the total count of its id over the table (a marginal)."""
    _, index = np.unique(ids, return_inverse=True)
    return np.bincount(index, weights=counts)[index]


def scores(table: Contingency | tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[str, float]:
    """VI and Rand scores of a contingency table (a ``Contingency`` or its ``to_arrays()``).

    Keys: ``voi_split``, ``voi_merge``, ``voi`` (their sum), ``rand_split`` (recall),
    ``rand_merge`` (precision), ``adapted_rand_error``. All are 0 for a perfect
    segmentation but the Rand scores, which are 1. See the module docstring.
    """
    seg, gt, counts = table.to_arrays() if isinstance(table, Contingency) else table
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        raise InputError("no labelled ground-truth voxels (gt != 0) to score against")
    seg_totals, gt_totals = _totals_by_id(seg, counts), _totals_by_id(gt, counts)

    # H(seg|gt) = sum_ij p_ij log2(t_j / p_ij) / n, from the counts directly so that a
    # perfect segmentation gives exactly 0 rather than a difference of rounded entropies.
    voi_split = float((counts * np.log2(gt_totals / counts)).sum() / total)
    voi_merge = float((counts * np.log2(seg_totals / counts)).sum() / total)

    # Sums of squared counts: sum_ij p_ij^2, sum_i s_i^2 and sum_j t_j^2, the last two
    # as sum_ij p_ij s_i (since sum_j p_ij = s_i) and sum_ij p_ij t_j.
    sum_pairs = (counts**2).sum()
    sum_seg = (seg_totals * counts).sum()
    sum_gt = (gt_totals * counts).sum()
    rand_split, rand_merge = float(sum_pairs / sum_gt), float(sum_pairs / sum_seg)
    return {
        "voi_split": voi_split,
        "voi_merge": voi_merge,
        "voi": voi_split + voi_merge,
        "rand_split": rand_split,
        "rand_merge": rand_merge,
        "adapted_rand_error": 1.0 - 2.0 * rand_split * rand_merge / (rand_split + rand_merge),
    }


def evaluate(seg: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """``scores`` of a segmentation against ground truth that both fit in memory."""
    table = Contingency()
    table.add(seg, gt)
    return scores(table)
