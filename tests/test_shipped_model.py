"""The MRI model that ships inside the package: it loads (hash checked), says what it
is, and still segments a real validation scan well when the data is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from psc.models.shipped import ShippedWeights

DEFAULT_WEIGHTS = ShippedWeights.MRI_TISSUE.value.path
from psc.models.weights import load_weights
from psc.pipelines.mri import config

IBSR = Path(__file__).resolve().parents[2] / "shared" / "data" / "ibsr18"


def test_shipped_weights_load_and_describe_themselves():
    model, card = load_weights(DEFAULT_WEIGHTS)
    assert DEFAULT_WEIGHTS.stat().st_size < 10 * 2**20  # small enough to ship
    assert (card.backbone, card.conv) == ("densenet3d", "p2sc2")
    assert card.labels == config.LABELS and tuple(card.spacing) == config.SPACING
    assert "IBSR" in card.training["data"] and "not redistributed" in card.training["terms"]
    assert set(card.training["val_cases"]).isdisjoint(card.training["train_cases"])
    with torch.no_grad():
        assert model(torch.zeros(1, 1, 32, 32, 32)).shape == (1, 4, 32, 32, 32)


@pytest.mark.skipif(not IBSR.is_dir(), reason="../shared/data is absent")
def test_shipped_model_meets_the_dice_target_on_the_validation_scans():
    """The issue's target: mean Dice over CSF/GM/WM >= 0.90 on the validation subjects,
    on the input grid, with psc-segment's defaults."""
    from psc.pipelines.mri.inference import segment_scan
    from psc.pipelines.mri.io import read_scan
    from psc.pipelines.mri.metrics import dice_per_class

    model, card = load_weights(DEFAULT_WEIGHTS)
    means = []
    for case in card.training["val_cases"]:
        scan = read_scan(IBSR / case / f"{case}.nii.gz")
        truth = read_scan(IBSR / case / f"{case}_seg.nii.gz").array
        dice = dice_per_class(segment_scan(scan, model, card, device="cpu").labels, truth, (1, 2, 3))
        # Measured when shipped (fp32 and bf16 alike): IBSR_07 0.878 / 0.923 / 0.930,
        # IBSR_16 0.845 / 0.942 / 0.918.
        assert dice[1] > 0.83 and dice[2] > 0.91 and dice[3] > 0.91, (case, dice)
        means.append(np.mean(list(dice.values())))
    assert np.mean(means) >= 0.90, means
