"""psc's Dice and HD95 against independent implementations (MONAI, SimpleITK)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.metrics import compute_dice

from psc.pipelines.mri.metrics import dice_per_class, hd95_per_class, volume_difference


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
