"""The inference path lands on the input's exact grid, whatever the input geometry.

A stand-in network with a known answer (ThresholdNet) isolates the geometry: after
reorientation, resampling to model spacing, sliding windows and the way back, its
labels must line up with the structure of the input voxels they came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mri_fixtures import ThresholdNet, brain_phantom, oblique_affine, save_nifti, save_tiny_model, threshold_card
from psc.models.weights import load_weights
from psc.utils.errors import InputError
from psc.pipelines.mri.inference import resolve_device, segment_scan, to_input_grid
from psc.pipelines.mri.io import Scan, read_scan


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("affine", [
    np.diag([1.0, 1.0, 1.0, 1.0]),
    oblique_affine(zooms=(0.9, 1.5, 0.9), angle_deg=25),
    oblique_affine(zooms=(1.1, 0.8, 1.4), angle_deg=-10, flip=(-1, 1, -1)),
    np.diag([-0.9, -1.5, 0.9, 1.0]),
], ids=["identity", "oblique-anisotropic", "oblique-flipped", "flipped-LPS"])
@pytest.mark.parametrize("tta", [False, True])
def test_labels_come_back_on_the_input_grid(tmp_path, affine, tta):
    image, truth = brain_phantom()
    scan = read_scan(save_nifti(tmp_path / "t1.nii.gz", image, affine))
    seg = segment_scan(scan, ThresholdNet(), threshold_card(), device="cpu", overlap=0.25, tta=tta)
    assert seg.labels.shape == image.shape and seg.labels.dtype == np.uint8
    assert seg.probabilities.shape == (4, *image.shape) and seg.probabilities.dtype == np.float32
    # Edge voxels too: the way back must not fade probabilities towards zero at the border.
    np.testing.assert_allclose(seg.probabilities.sum(0), 1.0, atol=1e-4)
    assert not seg.labels[truth == 0].any()  # outside the brain: background
    # Resampling blurs the brain edge, which moves the stand-in's brain-mean threshold;
    # a flipped or shifted grid would score far lower than these bounds.
    assert dice(seg.labels == 3, truth == 3) > 0.87
    assert dice(seg.labels == 2, truth == 2) > 0.85


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, 1, -1)])
def test_without_resampling_the_labels_are_exact(tmp_path, flip):
    """Model spacing = input spacing, axis-aligned: no interpolation anywhere, so the
    stand-in's answer must come back voxel for voxel (any offset or flip would show)."""
    image, truth = brain_phantom()
    affine = np.diag([*flip, 1.0]) @ np.diag([1.0, 1.5, 1.0, 1.0])
    scan = read_scan(save_nifti(tmp_path / "t1.nii.gz", image, affine))
    seg = segment_scan(scan, ThresholdNet(), threshold_card((1.0, 1.5, 1.0)), device="cpu")
    np.testing.assert_array_equal(seg.labels, truth)


def test_mask_replaces_the_nonzero_brain(tmp_path):
    image, truth = brain_phantom()
    scan = read_scan(save_nifti(tmp_path / "t1.nii.gz", image, np.eye(4)))
    mask = read_scan(save_nifti(tmp_path / "mask.nii.gz", (truth == 3).astype(np.uint8), np.eye(4)))
    seg = segment_scan(scan, ThresholdNet(), threshold_card(), device="cpu", mask=mask)
    assert not seg.labels[truth != 3].any()


def test_mask_on_another_grid_is_refused(tmp_path):
    image, truth = brain_phantom()
    scan = read_scan(save_nifti(tmp_path / "t1.nii.gz", image, np.eye(4)))
    mask = read_scan(save_nifti(tmp_path / "mask.nii.gz", (truth > 0).astype(np.uint8), np.diag([2, 1, 1, 1.0])))
    with pytest.raises(InputError, match="different grid"):
        segment_scan(scan, ThresholdNet(), threshold_card(), device="cpu", mask=mask)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_window_callback_counts_every_window(tmp_path, overlap):
    """The progress total is predicted before the first window; it must be what the
    inferer then runs, or the bar would stop short or overrun."""
    image, _ = brain_phantom((40, 36, 44))
    scan = read_scan(save_nifti(tmp_path / "t1.nii.gz", image, np.eye(4)))
    calls = []
    seg = segment_scan(scan, ThresholdNet(), threshold_card((1, 1, 1)), device="cpu", overlap=overlap,
                       window=(16, 12, 20), on_window=lambda done, total: calls.append((done, total)))
    assert len(calls) > 1 and calls[-1] == (len(calls), len(calls)) == (seg.windows, seg.windows)


def test_whole_crop_is_one_window_until_the_cap(tmp_path, monkeypatch):
    """By default a brain crop runs as one window; above the voxel cap it is tiled into
    INFERENCE_WINDOW windows, and the labels are the same either way for a network
    whose answer does not depend on context."""
    from psc.pipelines.mri import config
    from psc.pipelines.mri.inference import choose_window

    image, _ = brain_phantom((40, 36, 44))
    scan = read_scan(save_nifti(tmp_path / "t1.nii.gz", image, np.eye(4)))
    whole = segment_scan(scan, ThresholdNet(), threshold_card((1, 1, 1)), device="cpu", precision="fp32")
    assert whole.windows == 1
    monkeypatch.setattr(config, "WHOLE_WINDOW_MAX_VOXELS", 1000)
    monkeypatch.setattr(config, "INFERENCE_WINDOW", (16, 12, 20))
    tiled = segment_scan(scan, ThresholdNet(), threshold_card((1, 1, 1)), device="cpu", precision="fp32")
    assert tiled.windows > 1
    assert np.array_equal(whole.labels, tiled.labels)
    assert choose_window((10, 50, 50)) == (10, 12, 20)  # never larger than the crop
    assert choose_window((30, 30, 30), (8, 8, 8)) == (8, 8, 8)
    with pytest.raises(InputError):
        choose_window((30, 30, 30), (8, 8))


def test_devices_are_checked():
    assert resolve_device("cpu").type == "cpu"
    for bad in ("tpu", "cuda:x", "gpu0", ""):
        with pytest.raises(InputError):
            resolve_device(bad)
    with pytest.raises(InputError):
        segment_scan(None, None, None, overlap=1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_with_amp_agrees_with_cpu(tmp_path):
    """Windows on the GPU in fp16, stitched in CPU memory: the labels must match the
    CPU's but for a few boundary voxels where fp16 rounding tips the argmax."""
    image, _ = brain_phantom()
    scan = read_scan(save_nifti(tmp_path / "t1.nii.gz", image, oblique_affine()))
    model, card = load_weights(save_tiny_model(tmp_path / "tiny.pt"))
    cpu = segment_scan(scan, model, card, device="cpu")
    gpu = segment_scan(scan, model, card, device="cuda", precision="fp16", tta=True)
    cpu_tta = segment_scan(scan, model, card, device="cpu", tta=True)
    assert (gpu.labels == cpu_tta.labels).mean() > 0.99
    assert cpu.labels.shape == gpu.labels.shape


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, 1, -1)])
@pytest.mark.parametrize("crop", ["inside", "edge"])
def test_resampling_only_near_the_crop_equals_resampling_the_whole_grid(tmp_path, flip, crop):
    """to_input_grid resamples only the input voxels near the crop; everywhere else the
    whole-grid resampling gives pure background. Checked against MONAI's SpatialResample
    over the whole grid, for an oblique, flipped input and a crop that reaches the model
    grid's edge (where "border" padding decides the outermost input voxels)."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    from psc.pipelines.mri.preprocess import to_meta, to_model_space

    affine = oblique_affine(flip=flip)
    scan = Scan(tmp_path / "scan.nii.gz", np.ones((30, 26, 28), np.float32), affine)
    image = to_model_space(to_meta(scan.array, affine), (1.0, 1.5, 1.0))
    grid = image.shape[1:]
    box = tuple(slice(3, n - 4) for n in grid) if crop == "inside" else (slice(0, grid[0] - 5), slice(2, grid[1]),
                                                                       slice(4, grid[2] - 3))
    generator = torch.Generator().manual_seed(0)
    probs = torch.zeros((4, *grid))
    probs[0] = 1.0
    inner = torch.rand((4, *[b.stop - b.start for b in box]), generator=generator)
    probs[(slice(None), *box)] = inner / inner.sum(0, keepdim=True)
    whole = SpatialResample(mode="bilinear", padding_mode="border")(
        MetaTensor(probs, affine=image.affine), dst_affine=torch.as_tensor(affine),
        spatial_size=scan.array.shape).as_tensor().numpy()
    near = to_input_grid(probs, image.affine, box, scan)
    assert near.shape == whole.shape
    np.testing.assert_allclose(near, whole, atol=1e-5)
    assert (np.abs(whole - [[[[1]]], [[[0]]], [[[0]]], [[[0]]]]).sum(0) > 1e-3).mean() > 0.2  # not all background
