"""Agreement between a label map and ground truth, per tissue class."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance

from psc.utils.errors import InputError

# A label map has a handful of classes; an image (a T1 given by mistake) hundreds or
# thousands of distinct values. More than this (or 8 per class, whichever is more) and
# the file is refused as an image rather than scored as Dice 0.
MAX_LABEL_VALUES = 64


def check_label_map(array: np.ndarray, table, prediction: bool = True) -> None:
    """Refuse what is not a label map of ``table`` (label indices; 0, background, is
    always allowed), with one sentence (without the file name): negative or fractional
    voxels (a probability map, a float image), far more distinct values than classes
    (an image) and, for a ``prediction``, labels outside the table (9, 255...), which
    would otherwise be scored silently as misses. A ground truth may hold classes that
    are not scored (a lesion label, say), but not mostly such voxels."""
    table = sorted({0, *(int(i) for i in table)})
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise InputError("is not a label map (it has fractional voxels: a probability map or an image?)")
    if array.size and array.min() < 0:
        raise InputError("is not a label map (it has negative voxels)")
    values = np.unique(array)
    if len(values) > max(MAX_LABEL_VALUES, 8 * len(table)):
        raise InputError(f"is not a label map ({len(values)} distinct values for a table of {len(table)} labels: "
                         "an image given by mistake?)")
    extra = [int(v) for v in values if int(v) not in table]
    if not prediction and extra:
        outside = ~np.isin(array, table)
        share = outside.sum() / max(int(np.count_nonzero(array)), 1)
        if share > 0.5:  # a T1 with few grey levels, or the labels of another atlas
            raise InputError(f"is not a label map of this label table: {100 * share:.0f}% of its labelled voxels "
                             f"are outside it ({', '.join(map(str, extra[:6]))}{', ...' if len(extra) > 6 else ''};"
                             f" the table: {', '.join(map(str, table))}): an image given by mistake?")
    if prediction and extra:
        shown = ", ".join(map(str, extra[:6])) + (", ..." if len(extra) > 6 else "")
        raise InputError(f"is not a label map of this label table: it has label{'s' if len(extra) > 1 else ''} "
                         f"{shown}, the table only {', '.join(map(str, table))} (--labels INDEX=NAME adds classes)")


def dice_per_class(pred: np.ndarray, truth: np.ndarray, classes) -> dict[int, float]:
    """Dice of each class; NaN where the class is absent from both (no evidence
    either way, so it must not count as perfect or as failed in a mean)."""
    scores = {}
    for c in classes:
        p, t = pred == c, truth == c
        denom = int(p.sum()) + int(t.sum())
        scores[c] = 2.0 * int((p & t).sum()) / denom if denom else float("nan")
    return scores


def hd95_per_class(pred: np.ndarray, truth: np.ndarray, classes, spacing) -> dict[int, float]:
    """95th-percentile symmetric Hausdorff distance in mm (MONAI); NaN where a class
    is missing from either map."""
    scores = {}
    for c in classes:
        p, t = pred == c, truth == c
        if not p.any() or not t.any():
            scores[c] = float("nan")
            continue
        with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal argument
            warnings.simplefilter("ignore", FutureWarning)
            distance = compute_hausdorff_distance(torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None],
                                                  percentile=95, spacing=list(spacing))
        scores[c] = float(distance)
    return scores


def volume_difference(pred: np.ndarray, truth: np.ndarray, classes) -> dict[int, float]:
    """(predicted - true) volume, percent of the true volume."""
    out = {}
    for c in classes:
        true = int((truth == c).sum())
        out[c] = 100.0 * (int((pred == c).sum()) - true) / true if true else float("nan")
    return out
