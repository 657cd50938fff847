"""Agreement between a label map and ground truth, per tissue class."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import compute_hausdorff_distance


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
