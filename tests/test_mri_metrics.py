"""psc's Dice and HD95 against independent implementations (MONAI, SimpleITK)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice

from psc.pipelines.mri.metrics import check_label_map, dice_per_class, hd95_per_class, volume_difference
from psc.utils.errors import InputError


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dice_agrees_with_monai_and_simpleitk(seed):
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, 4, (20, 22, 18))
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 4, truth.shape))
    ours = dice_per_class(pred, truth, [1, 2, 3])

    onehot = lambda a: torch.nn.functional.one_hot(torch.from_numpy(a), 4).permute(3, 0, 1, 2)[None]
    monai = compute_dice(onehot(pred), onehot(truth), include_background=False)[0].numpy()
    overlap = sitk.LabelOverlapMeasuresImageFilter()
    overlap.Execute(sitk.GetImageFromArray(pred.astype(np.uint8)), sitk.GetImageFromArray(truth.astype(np.uint8)))
    for c in (1, 2, 3):
        assert ours[c] == pytest.approx(float(monai[c - 1]), abs=1e-6)
        assert ours[c] == pytest.approx(overlap.GetDiceCoefficient(c), abs=1e-6)


def sphere(radius, shape=(48, 48, 48)):
    grid = np.stack(np.meshgrid(*[np.arange(s) - s // 2 for s in shape], indexing="ij"))
    return (np.sqrt((grid**2).sum(0)) <= radius).astype(np.uint8)


def test_hd95_of_concentric_spheres_is_the_radius_gap_in_mm():
    a, b = sphere(10), sphere(14)
    assert hd95_per_class(a, b, [1], (1, 1, 1))[1] == pytest.approx(4, abs=1.0)
    assert hd95_per_class(a, b, [1], (2, 2, 2))[1] == pytest.approx(8, abs=2.0)
    assert hd95_per_class(a, a, [1], (1, 1, 1))[1] == 0
    assert np.isnan(hd95_per_class(a, np.zeros_like(a), [1], (1, 1, 1))[1])


def test_volume_difference_is_percent_of_truth():
    truth = np.zeros((10, 10, 10), int)
    truth[:5] = 1
    pred = np.zeros_like(truth)
    pred[:6] = 1
    assert volume_difference(pred, truth, [1])[1] == pytest.approx(20.0)


def test_dice_agrees_with_monai_dice_metric_on_a_valid_label_map():
    from monai.metrics import DiceMetric

    rng = np.random.default_rng(7)
    truth = rng.integers(0, 4, (16, 18, 14))
    pred = np.where(rng.random(truth.shape) < 0.8, truth, rng.integers(0, 4, truth.shape))
    check_label_map(pred, [1, 2, 3])  # a valid prediction passes
    onehot = lambda a: torch.nn.functional.one_hot(torch.from_numpy(a), 4).permute(3, 0, 1, 2)[None]  # noqa: E731
    metric = DiceMetric(include_background=False, reduction="none")
    metric(onehot(pred), onehot(truth))
    monai = metric.aggregate()[0].numpy()
    ours = dice_per_class(pred, truth, [1, 2, 3])
    for c in (1, 2, 3):
        assert ours[c] == pytest.approx(float(monai[c - 1]), abs=1e-6)


@pytest.mark.parametrize("case,words", [
    ("outside-9", "labels 9, 255"), ("fractional", "fractional"), ("negative", "negative"),
    ("image", "distinct values"),
])
def test_check_label_map_refuses_what_is_not_a_label_map_of_the_table(case, words):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (12, 12, 12)).astype(np.uint8)
    if case == "outside-9":
        labels[0, 0, 0], labels[1, 1, 1] = 9, 255
    elif case == "fractional":
        labels = labels / 3.0
    elif case == "negative":
        labels = labels.astype(np.int16) - 1
    elif case == "image":  # a T1: integer intensities, hundreds of values
        labels = rng.integers(0, 900, labels.shape).astype(np.int16)
    with pytest.raises(InputError, match=words) as info:
        check_label_map(labels, [1, 2, 3])
    assert str(info.value).startswith("is not a label map")


def test_a_ground_truth_may_hold_classes_that_are_not_scored():
    truth = np.zeros((8, 8, 8), np.uint8)
    truth[1:5] = 2
    truth[0] = 4  # a lesion label, say
    check_label_map(truth, [1, 2, 3], prediction=False)
    with pytest.raises(InputError, match="label 4"):
        check_label_map(truth, [1, 2, 3])
    check_label_map(truth, [1, 2, 3, 4])  # --labels 4=lesion adds it
    mostly = np.full((8, 8, 8), 4, np.uint8)  # labels of another table: refused as truth too
    with pytest.raises(InputError, match="100% of its labelled voxels"):
        check_label_map(mostly, [1, 2, 3], prediction=False)
