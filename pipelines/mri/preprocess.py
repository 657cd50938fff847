"""From a scan's voxel grid to the model's, identically in training and inference.

Reorientation and resampling are MONAI's (``Orientation``, ``Spacing``) on a
``MetaTensor`` carrying the affine, so the affine of every intermediate grid is
known and the way back (see ``inference``) is exact bookkeeping, not guesswork.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import NormalizeIntensity, Orientation, Spacing

from psc.models.weights import WeightsError


def to_meta(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    """A channel-first MetaTensor (1, X, Y, Z) for a 3D array and its affine."""
    tensor = torch.as_tensor(np.ascontiguousarray(array))[None]
    return MetaTensor(tensor, affine=torch.as_tensor(affine, dtype=torch.float64))


def to_model_space(image: MetaTensor, spacing: Sequence[float], orientation: str = "RAS",
                   label: bool = False) -> MetaTensor:
    """Reorient to ``orientation`` and resample to ``spacing`` (mm). Labels use nearest
    neighbour, images linear interpolation."""
    image = Orientation(axcodes=orientation, labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)
    mode = "nearest" if label else "bilinear"
    return Spacing(pixdim=tuple(spacing), mode=mode, padding_mode="zeros")(image)


def normalise(image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Z-score over brain voxels: ``mask`` if given, else the nonzero voxels (scans are
    skull-stripped). Scale-free, so scanners with 5x different intensity ranges land
    in the same range. Voxels outside the brain are 0."""
    image = image.float()
    if mask is None:
        return NormalizeIntensity(nonzero=True)(image)
    mask = mask.bool()
    values = image[mask]
    if values.numel() < 2:
        raise ValueError("the brain mask selects fewer than two voxels")
    out = torch.zeros_like(image)
    out[mask] = (values - values.mean()) / values.std().clamp_min(1e-8)
    return out


NORMALISATIONS = {"zscore-nonzero": normalise}  # the card's ``normalisation`` -> its function


def normaliser(name: str):
    """The intensity transform named ``name``: inference takes the name from the model
    card, training from its config and writes it onto the card it exports."""
    try:
        return NORMALISATIONS[name]
    except KeyError:
        raise WeightsError(f"the model card names the MRI normalisation {name!r}, which this "
                           f"version of psc does not know ({', '.join(NORMALISATIONS)})") from None


def brain_bbox(image: torch.Tensor, margin: int = 8) -> tuple[slice, ...]:
    """Bounding box (per spatial axis, with ``margin``) of the nonzero voxels of a
    channel-first image; the network only needs to see this region."""
    nonzero = (image.abs().sum(0) > 0).nonzero()
    if nonzero.numel() == 0:
        raise ValueError("the image has no nonzero (brain) voxels")
    low = (nonzero.min(0).values - margin).clamp_min(0)
    high = nonzero.max(0).values + margin + 1
    return tuple(slice(int(lo), int(min(hi, size))) for lo, hi, size in zip(low, high, image.shape[1:]))
