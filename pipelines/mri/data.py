"""Labelled scans for training: discovery of (image, label) pairs, their one-time
preprocessing into model space, and random training patches (MONAI transforms)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandBiasFieldd,
    RandCropByLabelClassesd,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from .preprocess import brain_bbox, normalise, to_meta, to_model_space

LABEL_SUFFIXES = ("_seg", "_dseg", "_labels", "_label")
IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".mgz")


@dataclass
class Pair:
    case: str
    image: Path
    label: Path


def _split_ext(path: Path) -> tuple[str, str]:
    for ext in IMAGE_EXTENSIONS:
        if path.name.endswith(ext):
            return path.name[: -len(ext)], ext
    return path.stem, path.suffix


def find_pairs(data_dir: str | Path) -> list[Pair]:
    """Every ``<stem><ext>`` with a label file ``<stem>_seg<ext>`` (or ``_dseg``,
    ``_labels``, ``_label``) beside it, anywhere below ``data_dir``, sorted by stem."""
    data_dir = Path(data_dir)
    pairs = []
    for label in sorted(data_dir.rglob("*")):
        stem, ext = _split_ext(label)
        if ext not in IMAGE_EXTENSIONS:
            continue
        for suffix in LABEL_SUFFIXES:
            if stem.endswith(suffix):
                image = label.with_name(stem[: -len(suffix)] + ext)
                if image.is_file():
                    pairs.append(Pair(image.name[: -len(ext)], image, label))
                break
    return sorted(pairs, key=lambda p: p.case)


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D image, got shape {data.shape}")
    return data, img.affine


def prepare_case(pair: Pair, spacing: Sequence[float], orientation: str = "RAS", margin: int = 8) -> dict:
    """Image and label in model space, image normalised, both cropped to the brain."""
    image, affine = _load(pair.image)
    label, label_affine = _load(pair.label)
    if image.shape != label.shape or not np.allclose(affine, label_affine, atol=1e-3):
        raise ValueError(f"{pair.case}: image and label grids differ")
    image_ms = to_model_space(to_meta(image.astype(np.float32), affine), spacing, orientation)
    label_ms = to_model_space(to_meta(label.astype(np.float32), affine), spacing, orientation, label=True)
    image_ms = normalise(image_ms.as_tensor())
    box = (slice(None), *brain_bbox(image_ms, margin))
    return {
        "case": pair.case,
        "image": image_ms[box].contiguous(),
        "label": label_ms.as_tensor()[box].round().to(torch.uint8).contiguous(),
    }


def training_transforms(patch_size: Sequence[int], samples: int, num_classes: int,
                        class_ratios: Sequence[float]) -> Compose:
    """Patches biased to every tissue class (CSF is small, so it gets its own share),
    left-right flips, and intensity/bias-field augmentation for scanner variety."""
    keys = ["image", "label"]
    return Compose([
        RandCropByLabelClassesd(keys, label_key="label", spatial_size=tuple(patch_size), num_classes=num_classes,
                                ratios=list(class_ratios), num_samples=samples, allow_smaller=False),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandBiasFieldd("image", prob=0.3, coeff_range=(0.0, 0.2)),
        RandScaleIntensityd("image", factors=0.15, prob=0.5),
        RandShiftIntensityd("image", offsets=0.15, prob=0.5),
        RandAdjustContrastd("image", prob=0.2, gamma=(0.8, 1.25)),
        RandGaussianNoised("image", prob=0.15, std=0.05),
    ])
