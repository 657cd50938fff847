"""Scanner and resolution augmentation for MRI tissue training (the "robust" recipe).

Why: the shipped model learned from nine IBSR scans of one site, all acquired with
1.5 mm coronal slices. A scan from another scanner differs in contrast (sequence,
field strength), in its bias field (coil sensitivity) and in its noise, and a clinical
scan is often coarser (1.5-2 mm voxels, or 3-5 mm thick slices). An independent probe
found that today's model labels almost no CSF on scans resampled to 3 mm (Dice 0) or
to 1 x 1 x 5 mm slices (Dice 0.11). The remedy followed here is SynthSeg's (Billot et
al., "SynthSeg: Segmentation of brain MRI scans of any contrast and resolution without
retraining", Medical Image Analysis 86, 2023): corrupt each training image the way an
acquisition would, with a random bias field, random contrast, noise and a random
acquisition resolution, blurring with a Gaussian point-spread function before
downsampling and resampling back to the model grid, while the labels stay on the model
grid, so that the network learns to label at model resolution from blurry inputs.
Unlike SynthSeg the images are the real IBSR scans, not images synthesised from labels.

Where this happens relative to the normalisation matters. Inference z-scores the whole
brain (``preprocess.normalise``) of whatever scan it is given, after the scanner's bias
field, contrast and resolution have acted. So the recipe works on the unnormalised
model-space image of a whole case (positive intensities, 0 outside the brain: a bias
field is then really a multiplicative field, a gamma curve a monotone map of positive
intensities), corrupts it, and only then normalises it over the brain with the very
function inference uses, before the patches are cut. A multiplicative field on z-scored
values (negative for every voxel darker than the brain's mean) would not be a bias field.

Every random transform here is a MONAI ``Randomizable`` inside one ``Compose``, so the
training scaffold's checkpoint captures its random state (``data.sampler_state``) and a
resumed run draws the very same images. MONAI's own transforms are used where they
exist: ``RandAdjustContrastd`` (gamma), ``RandHistogramShiftd`` (non-linear contrast),
``RandBiasFieldd`` (Legendre-polynomial log field, Van Leemput et al. 1999),
``RandRicianNoised`` (the magnitude-image noise of MRI), ``MaskIntensityd``,
``RandScaleIntensityd``/``RandShiftIntensityd``. MONAI's ``RandSimulateLowResolution``
(nnU-Net's) zooms every axis by one factor with nearest-neighbour downsampling and no
anti-aliasing, so it can simulate neither thick slices nor a point-spread function:
``RandSimulateAcquisitiond`` below does both.
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.networks.layers import gaussian_1d, separable_filtering
from monai.transforms import (
    Compose,
    DeleteItemsd,
    MapTransform,
    MaskIntensityd,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandHistogramShiftd,
    RandomizableTransform,
    RandRicianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from .preprocess import normaliser

# SynthSeg's (lab2im ``blurring_sigma_for_downsampling``) point-spread function: a
# Gaussian of standard deviation 0.75 x the acquired voxel size.
PSF_SIGMA_PER_VOXEL = 0.75
BRAIN = "brain"  # the dictionary key of the brain mask while the recipe runs


def acquisition_sigma(spacing: Sequence[float], voxel: Sequence[float]) -> list[float]:
    """Per axis, the standard deviation (in voxels of the ``spacing`` grid) of the
    Gaussian that turns an image at ``spacing`` into one acquired with ``voxel`` (mm).

    SynthSeg blurs its 1 mm synthetic images with sigma = 0.75 x (voxel / 1 mm). A real
    scan on the model grid is already blurred by its own acquisition (about 0.75 of a
    model voxel), and Gaussian blurs add in variance, so the blur still to add is
    0.75 x sqrt(ratio^2 - 1) model voxels: 0 where the voxel is not coarser than the
    grid, so the transform is continuous at ratio 1 and does nothing there."""
    sigma = []
    for size, grid in zip(voxel, spacing):
        ratio = max(float(size) / float(grid), 1.0)
        sigma.append(PSF_SIGMA_PER_VOXEL * math.sqrt(ratio * ratio - 1.0))
    return sigma


def _blur(x: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian blur of a (N, C, X, Y, Z) tensor, replicate padding (a
    constant image stays constant up to its border), kernels truncated at 3 sigma."""
    kernels = [gaussian_1d(torch.tensor(s), truncated=3.0, approx="sampled", normalize=True) if s > 0
               else torch.ones(1) for s in sigma]
    return separable_filtering(x, kernels, mode="replicate")


def simulate_acquisition(image: torch.Tensor, spacing: Sequence[float], voxel: Sequence[float],
                         mask_threshold: float = 0.5) -> torch.Tensor:
    """``image`` (channel-first, on a grid of ``spacing`` mm, skull-stripped: 0 outside
    the brain) as if it had been acquired with voxels of ``voxel`` mm, skull-stripped at
    that resolution and resampled back onto its own grid.

    The image is blurred with the acquisition's point-spread function (also the
    anti-aliasing filter: ``acquisition_sigma``), sampled on the coarse grid (trilinear,
    corners aligned, about ``round((n - 1) / ratio) + 1`` points per axis), masked
    there with the coarse brain mask (the blurred mask >= ``mask_threshold``: a coarse
    scan is skull-stripped at its own resolution), and interpolated back to the input
    shape, trilinear, as ``preprocess.to_model_space`` brings a coarse scan onto the
    model grid. Axes whose voxel is not coarser than the grid are left alone. The
    result has the input's shape and type (a MetaTensor keeps its affine); where the
    image is constant over the blur's reach (and inside the brain) it is unchanged."""
    ratio = [max(float(v) / float(s), 1.0) for v, s in zip(voxel, spacing)]
    if all(r == 1.0 for r in ratio):
        return image
    x = torch.as_tensor(image).float()[None]  # (1, C, X, Y, Z), without the MetaTensor's meta
    channels, shape = x.shape[1], x.shape[2:]
    brain = (x != 0).any(1, keepdim=True).float()
    blurred = _blur(torch.cat([x, brain], 1), acquisition_sigma(spacing, voxel))
    coarse = [n if r == 1.0 else max(2, int(round((n - 1) / r)) + 1) for n, r in zip(shape, ratio)]
    low = F.interpolate(blurred, size=coarse, mode="trilinear", align_corners=True)
    low = low[:, :channels] * (low[:, channels:] >= mask_threshold)
    out = F.interpolate(low, size=shape, mode="trilinear", align_corners=True)[0]
    if isinstance(image, torch.Tensor):
        result = image.clone()  # keeps a MetaTensor's affine and meta
        result[...] = out.to(image.dtype)
        return result
    return out.numpy().astype(np.asarray(image).dtype)


class RandSimulateAcquisitiond(RandomizableTransform, MapTransform):
    """With probability ``prob``, ``simulate_acquisition`` of the images under ``keys``
    (never the labels) at a random resolution: with probability ``prob_thick`` thick
    slices (one random axis, thickness uniform in ``thick`` mm, the others at the grid's
    spacing), otherwise isotropic voxels uniform in ``isotropic`` mm (an axis already
    coarser than that keeps its spacing). SynthSeg samples isotropic and one-axis
    anisotropic resolutions the same way (Billot et al. 2023, ``SampleResolution``).
    ``spacing``: the grid of the images (the model space, mm per voxel)."""

    def __init__(self, keys: KeysCollection, spacing: Sequence[float], prob: float = 0.5,
                 isotropic: tuple[float, float] = (1.0, 2.0), thick: tuple[float, float] = (3.0, 5.0),
                 prob_thick: float = 0.5, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.spacing = tuple(float(s) for s in spacing)
        self.isotropic, self.thick, self.prob_thick = tuple(isotropic), tuple(thick), prob_thick
        self.voxel = self.spacing

    def randomize(self, data=None) -> None:
        super().randomize(None)
        if not self._do_transform:
            self.voxel = self.spacing
            return
        if self.R.rand() < self.prob_thick:
            voxel = list(self.spacing)
            axis = int(self.R.randint(len(voxel)))
            voxel[axis] = max(float(self.R.uniform(*self.thick)), voxel[axis])
        else:
            size = float(self.R.uniform(*self.isotropic))
            voxel = [max(size, s) for s in self.spacing]
        self.voxel = tuple(voxel)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = simulate_acquisition(d[key], self.spacing, self.voxel)
        return d


class BrainMaskd(MapTransform):
    """``d[mask_key]``: the brain, the nonzero voxels of ``d[key]`` (skull-stripped)."""

    def __init__(self, key: str = "image", mask_key: str = BRAIN) -> None:
        MapTransform.__init__(self, [key])
        self.key, self.mask_key = key, mask_key

    def __call__(self, data):
        d = dict(data)
        d[self.mask_key] = (torch.as_tensor(d[self.key]) != 0).as_subclass(torch.Tensor)
        return d


class UnitBrainMeand(MapTransform):
    """Divide the images under ``keys`` by their mean over the brain (nonzero voxels),
    and clamp them at 0: positive intensities of a common scale, so that the noise
    level below is relative to the tissue's intensity (IBSR's scanners differ 5x in
    scale). The z-score at the end removes the scale again."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).float().clamp_min(0)
            brain = image[image > 0]
            d[key] = image / (brain.mean() if brain.numel() else 1.0)
        return d


class Normalised(MapTransform):
    """The inference normalisation named ``normalisation`` (``preprocess.normaliser``,
    over the brain's nonzero voxels) of the images under ``keys``: what the card names
    and ``psc-segment`` applies to a whole scan."""

    def __init__(self, keys: KeysCollection, normalisation: str) -> None:
        MapTransform.__init__(self, keys)
        self.normalisation, self.function = normalisation, normaliser(normalisation)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.function(torch.as_tensor(d[key]).as_subclass(torch.Tensor))
        return d


def robust_transforms(spacing: Sequence[float], normalisation: str) -> list:
    """The "robust" recipe, applied to a whole case (``{"image": unnormalised model-space
    image, "label": labels}``) before the patches are cut; its output image is normalised
    as ``normalisation`` says. In acquisition order:

    1. contrast (the sequence): gamma 0.6-1.6 on the brain's [0, max] range, p 0.5
       (MONAI ``RandAdjustContrastd``); a non-linear monotone remapping of the intensity
       histogram, 8-12 control points, p 0.3 (``RandHistogramShiftd``): both keep the
       order of intensities and 0 at 0;
    2. bias field (the coil): exp of a degree-3 Legendre polynomial with coefficients
       uniform in (-0.15, 0.15), p 0.5 (``RandBiasFieldd``): on IBSR_01 its log spans
       about 0.53 over the brain on average (up to 0.76; a x0.77-x1.3 field);
    3. noise: Rician, std uniform in (0, 0.06) of the brain's mean intensity, p 0.3
       (``RandRicianNoised``), inside the brain only;
    4. resolution: ``RandSimulateAcquisitiond``, p 0.5: half of those isotropic 1-2 mm
       voxels, half thick slices of 3-5 mm along a random axis; images only;
    5. the inference normalisation over the brain, then a mild mismatch of its
       statistics (scale +-10 %, shift +-0.1, each p 0.3, inside the brain), as when a
       scan's brain mask takes in more or less CSF than IBSR's.
    """
    image = ["image"]
    return [
        UnitBrainMeand(image),
        BrainMaskd("image", BRAIN),
        RandAdjustContrastd(image, prob=0.5, gamma=(0.6, 1.6)),
        RandHistogramShiftd(image, num_control_points=(8, 12), prob=0.3),
        RandBiasFieldd(image, degree=3, coeff_range=(-0.15, 0.15), prob=0.5),
        RandRicianNoised(image, prob=0.3, std=0.06, sample_std=True, relative=False),
        MaskIntensityd(image, mask_key=BRAIN),
        RandSimulateAcquisitiond(image, spacing=spacing, prob=0.5, isotropic=(1.0, 2.0), thick=(3.0, 5.0),
                                 prob_thick=0.5),
        Normalised(image, normalisation),
        BrainMaskd("image", BRAIN),
        RandScaleIntensityd(image, factors=0.1, prob=0.3),
        RandShiftIntensityd(image, offsets=0.1, prob=0.3),
        MaskIntensityd(image, mask_key=BRAIN),
        DeleteItemsd(BRAIN),
    ]


def robust_augmentation(spacing: Sequence[float], normalisation: str) -> Compose:
    """``robust_transforms`` as one ``Compose`` (for tests and for looking at its images)."""
    return Compose(robust_transforms(spacing, normalisation))
