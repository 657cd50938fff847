"""The "robust" MRI augmentation (psc.pipelines.mri.augment), on real computation: a
simulated acquisition keeps what is constant, removes high frequencies along the
coarse axes only, keeps shape and affine and never touches labels; the bias field is
a smooth multiplicative field; the contrast changes keep the order of intensities;
the recipe normalises as inference does and is reproducible from its random state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import RandAdjustContrastd, RandBiasFieldd, RandHistogramShiftd, RandRicianNoised

from psc.pipelines.mri.augment import (RandSimulateAcquisitiond, acquisition_sigma, robust_augmentation,
                                       robust_transforms, simulate_acquisition)
from psc.pipelines.mri.data import (AUGMENTATIONS, find_pairs, prepare_case, sampler_input, sampler_state,
                                    set_sampler_state, training_transforms)
from psc.pipelines.mri.preprocess import normalise
from psc.utils.errors import InputError

from test_mri_train import phantom, write_dataset

SPACING = (1.0, 1.5, 1.0)


def brain_image(shape=(40, 36, 44), value=5.0):
    """A skull-stripped-like image: a box of ``value`` with 8 voxels of 0 around it."""
    image = torch.zeros((1, *shape))
    image[:, 8:-8, 8:-8, 8:-8] = value
    return image


def high_frequency_fraction(image: torch.Tensor, axis: int) -> float:
    """The share of the power along ``axis`` (of the spatial axes of a channel-first
    image; each line's mean left out) above half the Nyquist frequency."""
    spectrum = np.abs(np.fft.rfft(image[0].double().numpy(), axis=axis)) ** 2
    n = spectrum.shape[axis]
    return float(np.take(spectrum, range(n // 2, n), axis=axis).sum() / np.take(spectrum, range(1, n), axis=axis).sum())


def textured(shape=(40, 36, 44), seed=0):
    """The brain box times positive noise u(x, y) w(z): power at every frequency, and
    separable, so that a blur along z leaves the spectrum along x and y as it was."""
    rng = np.random.default_rng(seed)
    u = rng.uniform(0.5, 1.5, (1, shape[0], shape[1], 1))
    w = rng.uniform(0.5, 1.5, (1, 1, 1, shape[2]))
    return brain_image(shape) * torch.from_numpy((u * w).astype(np.float32))


def test_acquisition_sigma_is_zero_at_the_grid_and_synthsegs_psf_beyond():
    assert acquisition_sigma(SPACING, SPACING) == [0.0, 0.0, 0.0]
    assert acquisition_sigma(SPACING, (0.8, 1.0, 1.0)) == [0.0, 0.0, 0.0]  # finer than the grid: nothing to do
    sigma = acquisition_sigma(SPACING, (2.0, 3.0, 1.0))
    assert sigma[0] == pytest.approx(0.75 * np.sqrt(3)) and sigma[1] == pytest.approx(0.75 * np.sqrt(3))
    assert sigma[2] == 0.0


@pytest.mark.parametrize("voxel", [(2.0, 2.0, 2.0), (1.0, 1.5, 5.0), (4.0, 1.5, 1.0), (1.0, 4.5, 1.0)])
def test_simulated_acquisition_keeps_constant_regions_shape_and_affine(voxel):
    affine = torch.diag(torch.tensor([1.0, 1.5, 1.0, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-20.0, 7.0, 3.5], dtype=torch.float64)
    image = MetaTensor(brain_image((56, 48, 60)), affine=affine)
    out = simulate_acquisition(image, SPACING, voxel)
    assert isinstance(out, MetaTensor) and out.shape == image.shape and out.dtype == image.dtype
    assert torch.equal(out.affine, affine)
    # deep inside the box (further from its edge than the PSF's 3 sigma plus one coarse
    # voxel) it is still 5
    reach = [int(np.ceil(3 * s + v / g)) + 1 for s, v, g in zip(acquisition_sigma(SPACING, voxel), voxel, SPACING)]
    inside = (slice(None), *(slice(8 + r, -8 - r) for r in reach))
    assert out[inside].numel() > 500
    assert torch.allclose(out[inside].as_tensor(), torch.tensor(5.0), atol=1e-4)
    assert float(out[:, :2].abs().max()) == 0.0  # far outside the brain it stays 0
    assert not torch.equal(out.as_tensor(), image.as_tensor())  # the edges of the box did change
    # a constant image stays constant everywhere (replicate padding at the volume's border)
    full = torch.full((1, 30, 20, 25), 3.0)
    assert torch.allclose(simulate_acquisition(full, SPACING, voxel), full, atol=1e-5)


def test_simulated_acquisition_removes_high_frequencies_along_coarse_axes_only():
    image = textured()
    before = [high_frequency_fraction(image, axis) for axis in range(3)]
    thick = simulate_acquisition(image, SPACING, (1.0, 1.5, 4.0))  # 4 mm slices along the last axis
    after = [high_frequency_fraction(thick, axis) for axis in range(3)]
    assert after[2] < 0.05 * before[2], (before, after)
    for axis in (0, 1):  # in-plane, the texture keeps its fine detail
        assert after[axis] == pytest.approx(before[axis], rel=0.02), (axis, before, after)
    iso = simulate_acquisition(image, SPACING, (2.0, 2.0, 2.0))
    for axis in range(3):
        assert high_frequency_fraction(iso, axis) < 0.5 * before[axis]
    # a voxel no coarser than the grid changes nothing at all
    assert torch.equal(simulate_acquisition(image, SPACING, SPACING), image)


def test_random_acquisition_changes_images_never_labels():
    image, label = brain_image(), torch.randint(0, 4, (1, 40, 36, 44), dtype=torch.uint8)
    transform = RandSimulateAcquisitiond(["image"], spacing=SPACING, prob=1.0)
    seen = set()
    for seed in range(12):
        transform.set_random_state(seed)
        out = transform({"image": image, "label": label})
        assert out["label"] is label and torch.equal(label, out["label"])
        assert out["image"].shape == image.shape
        voxel = transform.voxel
        assert all(v >= s for v, s in zip(voxel, SPACING))
        coarse = [i for i, (v, s) in enumerate(zip(voxel, SPACING)) if v > s]
        if len(coarse) == 1 and voxel[coarse[0]] >= 3.0:
            seen.add("thick")
        elif all(1.0 <= v <= 2.0 or v == s for v, s in zip(voxel, SPACING)):
            seen.add("isotropic")
    assert seen == {"thick", "isotropic"}
    transform = RandSimulateAcquisitiond(["image"], spacing=SPACING, prob=0.0)
    assert transform({"image": image, "label": label})["image"] is image


def recipe_transform(kind):
    return next(t for t in robust_transforms(SPACING, "zscore-nonzero") if isinstance(t, kind))


def test_bias_field_is_smooth_and_multiplicative_on_positive_intensities():
    bias = recipe_transform(RandBiasFieldd)
    bias.prob = bias.rand_bias_field.prob = 1.0
    image = textured()
    outputs = []
    for scale in (1.0, 3.0):  # the same random state on two images: one and the same field
        bias.set_random_state(7)
        outputs.append(torch.as_tensor(bias({"image": image * scale})["image"]))
    brain = image > 0
    field = outputs[0][brain] / image[brain]
    assert torch.allclose(outputs[1][brain] / (3.0 * image[brain]), field, rtol=1e-5)
    assert float(outputs[0][~brain].abs().max()) == 0.0  # 0 stays 0
    assert float(field.max() / field.min()) > 1.05  # a real field
    assert bool((field > 0).all())
    # smooth: the log field (what it makes of a constant image) is a low-degree polynomial
    bias.set_random_state(7)
    log_field = torch.as_tensor(bias({"image": torch.ones_like(image)})["image"]).log()
    assert float(log_field.max() - log_field.min()) > 0.1
    assert torch.allclose(log_field[brain].exp(), field, rtol=1e-4)  # the field does not depend on the image
    for axis in range(1, 4):  # its curvature per voxel is tiny (the texture's log changes by ~0.5 a voxel)
        assert float(log_field.diff(n=2, dim=axis).abs().max()) < 0.02


@pytest.mark.parametrize("kind", [RandAdjustContrastd, RandHistogramShiftd])
def test_contrast_changes_keep_the_order_of_intensities(kind):
    transform = recipe_transform(kind)
    transform.prob = 1.0
    for child in vars(transform).values():
        if hasattr(child, "prob"):
            child.prob = 1.0
    image = textured()
    changed = 0
    for seed in range(5):
        transform.set_random_state(seed)
        out = torch.as_tensor(transform({"image": image})["image"])
        order = torch.argsort(image.flatten(), stable=True)
        assert bool((out.flatten()[order].diff() >= -1e-5).all())  # monotone in the input
        assert float(out[image == 0].abs().max()) == 0.0  # the background stays 0
        changed += not torch.allclose(out, image)
    assert changed >= 4


def test_noise_stays_inside_the_brain():
    transforms = robust_transforms(SPACING, "zscore-nonzero")
    noise = next(t for t in transforms if isinstance(t, RandRicianNoised))
    noise.prob = noise.rand_rician_noise.prob = 1.0
    from monai.transforms import Compose

    masked = Compose(transforms[:transforms.index(noise) + 2])  # the brain mask, ..., noise, MaskIntensityd
    for t in masked.transforms:
        if hasattr(t, "prob") and t is not noise:
            t.prob = 0.0
            for child in vars(t).values():
                if hasattr(child, "prob"):
                    child.prob = 0.0
    masked.set_random_state(3)
    image = brain_image()
    out = torch.as_tensor(masked({"image": image})["image"])
    assert float(out[image == 0].abs().max()) == 0.0
    assert float(out[image > 0].std()) > 0.0


def test_robust_recipe_normalises_like_inference_and_leaves_labels():
    image, label = phantom(shape=(40, 36, 40))
    image = torch.from_numpy(image)[None] * 7.0  # another scanner's scale
    label = torch.from_numpy(label)[None].to(torch.uint8)
    recipe = robust_augmentation(SPACING, "zscore-nonzero")
    for seed in range(6):
        recipe.set_random_state(seed)
        out = recipe({"image": image, "label": label})
        assert set(out) == {"image", "label"} and torch.equal(out["label"], label)
        result = torch.as_tensor(out["image"])
        assert result.shape == image.shape
        brain = result != 0
        assert float(result[~brain].abs().sum()) == 0.0
        # z-scored over the brain, up to the recipe's mild +-10 % / +-0.1 mismatch
        assert abs(float(result[brain].mean())) < 0.15 and 0.85 < float(result[brain].std()) < 1.15
    # the normalisation step is the inference function itself
    normalised = next(t for t in robust_transforms(SPACING, "zscore-nonzero") if type(t).__name__ == "Normalised")
    assert torch.equal(torch.as_tensor(normalised({"image": image.clone()})["image"]), normalise(image.clone()))


def patches(sampler, case, augmentation):
    return [(p["image"].as_tensor().clone(), p["label"].clone()) for p in sampler(sampler_input(case, augmentation))]


def same(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize("augmentation", AUGMENTATIONS)
def test_augmentation_is_reproducible_from_its_random_state(tmp_path, augmentation):
    write_dataset(tmp_path / "data", cases=1)
    case = prepare_case(find_pairs(tmp_path / "data")[0], SPACING, raw=True)
    assert float(case["raw"].min()) >= 0 and float(case["raw"].max()) > 100  # unnormalised intensities
    assert torch.equal(normalise(case["raw"].clone()), case["image"])

    def sampler(seed):
        s = training_transforms((16, 16, 16), 2, 4, (0.5, 1.5, 1.0, 1.0), augmentation=augmentation,
                                spacing=SPACING)
        s.set_random_state(seed=seed)
        return s

    first, again, other = sampler(0), sampler(0), sampler(1)
    draws = [patches(first, case, augmentation) for _ in range(4)]
    assert all(same(d, patches(again, case, augmentation)) for d in draws)  # same seed, same patches
    assert not all(same(d, patches(other, case, augmentation)) for d in draws)
    state = sampler_state(first)
    ahead = [patches(first, case, augmentation) for _ in range(3)]
    set_sampler_state(first, state)
    assert all(same(a, patches(first, case, augmentation)) for a in ahead)  # the checkpointed state replays


def test_recipes_differ_in_what_they_start_from_and_unknown_names_are_refused(tmp_path):
    write_dataset(tmp_path / "data", cases=1)
    case = prepare_case(find_pairs(tmp_path / "data")[0], SPACING, raw=True)
    assert sampler_input(case, "basic")["image"] is case["image"]
    assert sampler_input(case, "robust")["image"] is case["raw"]
    assert "raw" not in prepare_case(find_pairs(tmp_path / "data")[0], SPACING)
    with pytest.raises(InputError, match="unknown augmentation"):
        training_transforms((16, 16, 16), 2, 4, (1, 1, 1, 1), augmentation="strong")
    # every random transform of the robust sampler is one whose state the checkpoint keeps
    robust = training_transforms((16, 16, 16), 2, 4, (1, 1, 1, 1), augmentation="robust")
    basic = training_transforms((16, 16, 16), 2, 4, (1, 1, 1, 1), augmentation="basic")
    assert len(sampler_state(robust)) > len(sampler_state(basic))


def test_basic_recipe_still_resumes_exactly_and_the_card_names_the_recipe(tmp_path):
    """tests/test_training.py checks exact resume with the default ("robust") recipe;
    here the "basic" one, which old runs were trained with, and the card's record."""
    from psc.models.weights import load_weights
    from psc.pipelines.mri.train import train

    from test_mri_train import config
    from test_training import assert_same_run

    write_dataset(tmp_path / "data")

    def cfg(name, **kw):
        c = config(tmp_path, 6, augmentation="basic", **kw)
        c.out, c.val_every = str(tmp_path / name), 3
        return c

    train(cfg("whole", export=str(tmp_path / "w.pt")))
    train(cfg("cut"), stop_after=3)
    train(cfg("cut"), resume=True)
    assert_same_run(tmp_path / "whole", tmp_path / "cut")
    assert load_weights(tmp_path / "w.pt")[1].training["augmentation"] == "basic"
    with pytest.raises(InputError, match="unknown augmentation"):
        train(config(tmp_path, 2, augmentation="synthseg"))
