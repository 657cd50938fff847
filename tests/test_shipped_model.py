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
MRTRIX = IBSR.parent / "mrtrix-sub01"
# FreeSurfer aseg labels by tissue (../shared/data/README.md); aparc's cortical parcels (1000-2999) are GM
ASEG = {1: (4, 5, 14, 15, 24, 43, 44, 72, 31, 63),
        2: (3, 42, 8, 47, 10, 11, 12, 13, 17, 18, 26, 28, 49, 50, 51, 52, 53, 54, 58, 60),
        3: (2, 41, 7, 46, 16, 77, 85, 251, 252, 253, 254, 255)}


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


@pytest.mark.skipif(not (MRTRIX / "aparc+aseg.mgz").is_file(), reason="no ../shared/data/mrtrix-sub01")
def test_shipped_model_on_a_raw_scan_from_another_site_agrees_with_freesurfer(tmp_path, capsys):
    """mrtrix-sub01 (skull on, 1.8 mm, another scanner; no IBSR scan is like it) through
    psc-segment's defaults (deepbet), against FreeSurfer's aparc+aseg inside its labelled
    voxels: agreement with another tool, not accuracy (IBSR's manual GM/WM boundary sits
    elsewhere than FreeSurfer's). Also: almost nothing labelled outside the provided
    brain mask, and no plausibility warning."""
    import json

    import nibabel as nib
    from nibabel.processing import resample_from_to

    from psc.app.segment import main
    from psc.pipelines.mri.metrics import dice_per_class

    t1 = MRTRIX / "sub-01_T1w.nii.gz"
    assert main([str(t1), "-o", str(tmp_path)]) == 0
    capsys.readouterr()
    dseg = nib.load(str(tmp_path / "sub-01_T1w_dseg.nii.gz"))
    labels = np.asarray(dseg.dataobj).astype(np.int32)
    aseg = nib.load(str(MRTRIX / "aparc+aseg.mgz"))
    values = np.asarray(aseg.dataobj).astype(np.int32)
    tissue = np.zeros(values.shape, np.uint8)
    for cls, members in ASEG.items():
        tissue[np.isin(values, members)] = cls
    tissue[(values >= 1000) & (values < 3000)] = 2
    fs = np.asarray(resample_from_to(nib.Nifti1Image(tissue, aseg.affine), dseg, order=0).dataobj).astype(np.int32)
    dice = dice_per_class(np.where(fs > 0, labels, 0), fs, (1, 2, 3))
    # measured (bf16, 2026-12-02): GM 0.849, WM 0.819, 1.1 % outside (docs/results-mri.md)
    assert dice[2] > 0.80 and dice[3] > 0.78, dice
    mask = np.asarray(nib.load(str(MRTRIX / "sub-01_brainmask.nii.gz")).dataobj) > 0
    outside = float(((labels > 0) & ~mask).sum()) / float((labels > 0).sum())
    assert outside < 0.03, outside
    sidecar = json.loads((tmp_path / "sub-01_T1w_dseg.json").read_text())
    assert sidecar["Warnings"] == [], sidecar["Warnings"]


def test_the_coarse_model_is_the_equal_parameter_robust_one_and_voxel_size_chooses_it():
    from psc.models.weights import read_card
    from psc.pipelines.mri.default_model import default_model_for

    coarse = ShippedWeights.MRI_TISSUE_COARSE.value.card()
    conv3d_twin = read_card(Path(__file__).resolve().parents[1] / "benchmarks" / "weights"
                            / "mri_densenet3d_conv3d_robust.pt")
    assert coarse.conv == "p2sc2" and coarse.parameters <= conv3d_twin.parameters  # the paper's claim: fewer
    assert coarse.training["augmentation"] == "robust" and len(coarse.training["train_cases"]) == 11
    assert default_model_for((1.0, 1.5, 1.0)) == ShippedWeights.MRI_TISSUE.value
    assert default_model_for((2.04, 1.0, 1.0)) == ShippedWeights.MRI_TISSUE.value  # 2 mm, rounding allowed
    assert default_model_for((1.0, 1.0, 5.0)) == ShippedWeights.MRI_TISSUE_COARSE.value
    assert default_model_for((3.0, 3.0, 3.0)) == ShippedWeights.MRI_TISSUE_COARSE.value


def test_psc_segment_records_the_model_it_chose(tmp_path, capsys):
    """A 3 mm scan is segmented by the coarse model and a 1.5 mm one by the default, in
    one command; each sidecar names (and hashes) the file that segmented it."""
    import json

    import nibabel as nib

    from psc.app.segment import main
    from psc.pipelines.mri.sample import sample_t1_path

    sample = nib.load(str(sample_t1_path()))
    data = np.asarray(sample.dataobj, dtype=np.float32)
    fine = tmp_path / "fine.nii.gz"
    nib.save(nib.Nifti1Image(data[::1, ::1, ::1], sample.affine), fine)
    coarse = tmp_path / "coarse.nii.gz"
    nib.save(nib.Nifti1Image(data[::3, ::3, ::3], sample.affine @ np.diag([3, 3, 3, 1])), coarse)
    assert main([str(fine), str(coarse), "-o", str(tmp_path / "out")]) == 0
    assert "mri_densenet3d_p2sc2_coarse.pt (voxels coarser than 2 mm)" in capsys.readouterr().out
    for stem, record in (("fine", ShippedWeights.MRI_TISSUE.value), ("coarse", ShippedWeights.MRI_TISSUE_COARSE.value)):
        recorded = json.loads((tmp_path / "out" / f"{stem}_dseg.json").read_text())["Weights"]
        assert Path(recorded["Path"]) == record.path.resolve() and recorded["SHA256"] == record.card().sha256
