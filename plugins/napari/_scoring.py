"""Scores behind the Score widget, without any GUI: Dice per class (MRI) and, for EM,
VI / adapted Rand with the worst false merges and false splits, each with a position to
centre the viewer on.

Everything is read a slab (along the first axis) at a time, so lazy (dask/zarr) layers
larger than memory are scored with bounded memory, as ``psc-eval`` does.

From the contingency table p_ij (voxels of predicted segment i on ground-truth object j,
gt 0 left out): a *false merge* is a segment overlapping two or more objects, ranked by
its share of VI merge = H(gt|seg), sum_j p_ij log2(s_i / p_ij) / n; a *false split* is an
object covered by two or more segments, ranked by its share of VI split = H(seg|gt). Each
is located at the voxel nearest the centroid of its second-largest overlap: the piece
that was wrongly merged in, or split off.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from psc.pipelines.em.blocks import slabs
from psc.pipelines.em.metrics import contingency_of, scores

Progress = Callable[[int, int], None]


@dataclass
class ErrorSite:
    kind: str  # "merge" or "split"
    segment: int  # merge: the segment at fault; split: the largest segment on the object
    gt: int  # merge: the object the segment mostly covers; split: the object at fault
    others: list[int]  # merge: the other objects merged in; split: the other segments
    voxels: int  # voxels outside the largest overlap
    bits: float  # contribution to VI merge (merges) or VI split (splits)
    pair: tuple[int, int] = (0, 0)  # (segment, gt) of the overlap the centre is taken from
    centre: tuple[float, ...] | None = field(default=None)  # data (voxel) coordinates

    def ids(self) -> tuple[str, str]:
        """(segment ids, ground-truth ids) as short text, the one at fault first."""
        def listed(first, rest):
            shown = ", ".join(map(str, [first, *rest[:1]]))
            return shown + (f" +{len(rest) - 1}" if len(rest) > 1 else "")

        if self.kind == "merge":
            return str(self.segment), listed(self.gt, self.others)
        return listed(self.segment, self.others), str(self.gt)

    def describe(self) -> str:
        listed = ", ".join(map(str, self.others[:4])) + (" ..." if len(self.others) > 4 else "")
        if self.kind == "merge":
            return f"segment {self.segment} merges gt {self.gt} with {listed}"
        return f"gt {self.gt} split into segments {self.segment}, {listed}"


def _check_shapes(pred, gt) -> None:
    if tuple(pred.shape) != tuple(gt.shape):
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")


# --- MRI ------------------------------------------------------------------------------

def dice_table(pred, gt, names: dict[int, str] | None = None) -> list[tuple[int, str, float]]:
    """(label, name, Dice) for every label but 0 in ``names`` or in either map; NaN
    where a label is in neither (as ``dice_per_class``)."""
    from psc.pipelines.mri.metrics import dice_per_class

    _check_shapes(pred, gt)
    pred, gt = np.asarray(pred), np.asarray(gt)
    names = dict(names or {})
    classes = sorted({int(c) for c in names} | {int(c) for c in np.unique(pred)} | {int(c) for c in np.unique(gt)})
    classes = [c for c in classes if c != 0]
    dice = dice_per_class(pred, gt, classes)
    return [(c, names.get(c, f"label {c}"), float(dice[c])) for c in classes]


# --- EM -------------------------------------------------------------------------------

def contingency(pred, gt, progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The (segment, object, voxels) table, a slab at a time (the slabs ``locate`` walks)."""
    _check_shapes(pred, gt)
    return contingency_of(pred, gt, slabs(tuple(pred.shape), pred), progress).to_arrays()


def _groups(keys: np.ndarray, others: np.ndarray, counts: np.ndarray, total: float, skip_zero: bool):
    """Per distinct key (entries sorted by key): partners (by overlap, largest first),
    overlaps, wrong voxels and entropy contribution in bits; only keys with >= 2 partners."""
    if keys.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    ends = np.r_[starts[1:], keys.size]
    sums = np.add.reduceat(counts, starts)
    size = np.repeat(sums, ends - starts)
    bits = np.add.reduceat(counts * np.log2(size / counts), starts) / total
    found = []
    for k in np.flatnonzero((ends - starts) >= 2):
        key = int(keys[starts[k]])
        if skip_zero and key == 0:
            continue
        part = slice(starts[k], ends[k])
        order = np.argsort(-counts[part], kind="stable")
        partners = [int(v) for v in others[part][order]]
        overlaps = counts[part][order]
        found.append((key, partners, int(sums[k] - overlaps[0]), float(bits[k])))
    return found


def worst_errors(table: tuple[np.ndarray, np.ndarray, np.ndarray], count: int = 10) -> tuple[list, list]:
    """(false merges, false splits), each the ``count`` worst by VI contribution."""
    seg, gt, counts = table
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return [], []
    merges = [ErrorSite("merge", key, partners[0], partners[1:], wrong, bits, pair=(key, partners[1]))
              for key, partners, wrong, bits in _groups(seg, gt, counts, total, skip_zero=True)]
    order = np.lexsort((seg, gt))
    splits = [ErrorSite("split", partners[0], key, partners[1:], wrong, bits, pair=(partners[1], key))
              for key, partners, wrong, bits in _groups(gt[order], seg[order], counts[order], total,
                                                        skip_zero=True)]
    rank = lambda site: (-site.bits, -site.voxels)  # noqa: E731
    return sorted(merges, key=rank)[:count], sorted(splits, key=rank)[:count]


def locate(pred, gt, sites: list[ErrorSite], progress: Progress | None = None) -> None:
    """Set each site's ``centre``: the voxel of its overlap ``pair`` nearest to that
    overlap's centroid (so the centre lies on the error, even for a curved object).
    Two passes over the slabs; the second only over those the overlaps reach."""
    if not sites:
        return
    pairs = sorted({site.pair for site in sites})
    wanted = np.array(sorted({s for s, _ in pairs}), dtype=np.uint64)
    ndim = len(pred.shape)
    sums = {pair: np.zeros(ndim) for pair in pairs}
    n = dict.fromkeys(pairs, 0)
    reach = {pair: [np.inf, -np.inf] for pair in pairs}
    parts = list(slabs(tuple(pred.shape), pred))
    steps = 2 * len(parts)

    def matches(part):
        p = np.asarray(pred[part]).astype(np.uint64, copy=False)
        candidates = np.isin(p, wanted)
        if not candidates.any():
            return
        g = np.asarray(gt[part]).astype(np.uint64, copy=False)
        for pair in pairs:
            mask = candidates & (p == pair[0]) & (g == pair[1])
            if mask.any():
                coords = np.argwhere(mask).astype(np.float64)
                coords[:, 0] += part.start
                yield pair, coords

    for done, part in enumerate(parts, 1):
        for pair, coords in matches(part):
            sums[pair] += coords.sum(0)
            n[pair] += len(coords)
            reach[pair] = [min(reach[pair][0], coords[0, 0]), max(reach[pair][1], coords[-1, 0])]
        if progress:
            progress(done, steps)
    centroid = {pair: sums[pair] / n[pair] for pair in pairs if n[pair]}
    best: dict[tuple[int, int], tuple[float, np.ndarray]] = {}
    low = min((reach[p][0] for p in centroid), default=0)
    high = max((reach[p][1] for p in centroid), default=-1)
    for done, part in enumerate(parts, len(parts) + 1):
        if part.stop > low and part.start <= high:
            for pair, coords in matches(part):
                if pair not in centroid:
                    continue
                distance = ((coords - centroid[pair]) ** 2).sum(1)
                i = int(distance.argmin())
                if pair not in best or distance[i] < best[pair][0]:
                    best[pair] = (float(distance[i]), coords[i])
        if progress:
            progress(done, steps)
    for site in sites:
        if site.pair in best:
            site.centre = tuple(float(c) for c in best[site.pair][1])


@dataclass
class EMScore:
    scores: dict[str, float]
    merges: list[ErrorSite]
    splits: list[ErrorSite]


def score_em(pred, gt, count: int = 10, progress: Progress | None = None) -> EMScore:
    """VI / Rand scores (``psc.pipelines.em.metrics.scores``) and the worst errors, located."""
    parts = len(list(slabs(tuple(pred.shape), pred)))
    total = 3 * parts

    def stage(offset):
        return (lambda done, _: progress(offset + done, total)) if progress else None

    table = contingency(pred, gt, stage(0))
    merges, splits = worst_errors(table, count)
    locate(pred, gt, merges + splits, stage(parts))
    return EMScore(scores(table), merges, splits)
