"""Labelled scans for training: discovery of (image, label) pairs, their one-time
preprocessing into model space, and random training patches (MONAI transforms), with
one of the augmentation recipes ``AUGMENTATIONS`` names."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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
    Randomizable,
    Transform,
)

from psc.utils.errors import InputError
from .augment import robust_transforms
from .io import is_scan_file, read_scan, scan_stem
from .preprocess import brain_bbox, normaliser, to_meta, to_model_space

LABEL_SUFFIXES = ("_seg", "_dseg", "_labels", "_label")
# The augmentation recipes (``TrainConfig.augmentation``, onto the card's training
# record). "basic": what every model before issue 13 was trained with (flips and mild
# intensity changes of the normalised patch); "robust": scanner and resolution
# augmentation of the whole unnormalised case before it is normalised (augment.py).
AUGMENTATIONS = ("basic", "robust")


@dataclass
class Pair:
    case: str
    image: Path
    label: Path


def find_pairs(data_dir: str | Path) -> list[Pair]:
    """Every scan ``<stem><ext>`` with a label file ``<stem>_seg<ext>`` (or ``_dseg``,
    ``_labels``, ``_label``) beside it, anywhere below ``data_dir``, sorted by stem."""
    pairs = []
    for label in sorted(p for p in Path(data_dir).rglob("*") if is_scan_file(p)):
        stem = scan_stem(label)
        ext = label.name[len(stem):]
        for suffix in LABEL_SUFFIXES:
            if stem.endswith(suffix):
                case = stem[: -len(suffix)]
                if label.with_name(case + ext).is_file():
                    pairs.append(Pair(case, label.with_name(case + ext), label))
                break
    return sorted(pairs, key=lambda p: p.case)


def prepare_case(pair: Pair, spacing: Sequence[float], orientation: str = "RAS", margin: int = 8,
                 normalisation: str = "zscore-nonzero", raw: bool = False) -> dict:
    """Image and label in model space, image normalised (``normalisation``, the name the
    exported card will carry), both cropped to the brain. ``raw``: also ``"raw"``, the
    model-space image before normalisation, same crop (the "robust" recipe starts from
    it: its bias field and contrast act on positive intensities)."""
    image, label = read_scan(pair.image), read_scan(pair.label, labels=True)
    if image.array.shape != label.array.shape or not np.allclose(image.affine, label.affine, atol=1e-3):
        raise InputError(f"{pair.case}: image and label grids differ")
    image_ms = to_model_space(to_meta(image.array.astype(np.float32), image.affine), spacing, orientation)
    label_ms = to_model_space(to_meta(label.array.astype(np.float32), image.affine), spacing, orientation,
                              label=True)
    unnormalised = image_ms.as_tensor()
    image_ms = normaliser(normalisation)(unnormalised.clone())  # it normalises in place
    box = (slice(None), *brain_bbox(image_ms, margin))
    case = {
        "case": pair.case,
        "image": image_ms[box].contiguous(),
        "label": label_ms.as_tensor()[box].round().to(torch.uint8).contiguous(),
    }
    if raw:
        case["raw"] = unnormalised[box].float().contiguous()
    return case


def check_augmentation(name: str) -> str:
    if name not in AUGMENTATIONS:
        raise InputError(f"unknown augmentation {name!r} (known: {', '.join(AUGMENTATIONS)})")
    return name


def needs_raw(augmentation: str) -> bool:
    """Whether the recipe starts from the unnormalised image (``prepare_case(raw=True)``)."""
    return check_augmentation(augmentation) == "robust"


def sampler_input(case: dict, augmentation: str) -> dict:
    """What ``training_transforms(augmentation=...)`` takes for a prepared ``case``:
    the normalised image ("basic") or the unnormalised one ("robust"), and the labels."""
    image = case["raw"] if needs_raw(augmentation) else case["image"]
    return {"image": image, "label": case["label"]}


def training_transforms(patch_size: Sequence[int], samples: int, num_classes: int,
                        class_ratios: Sequence[float], augmentation: str = "basic",
                        spacing: Sequence[float] = (1.0, 1.5, 1.0), normalisation: str = "zscore-nonzero") -> Compose:
    """Patches biased to every tissue class (CSF is small, so it gets its own share) and
    left-right flips, with the ``augmentation`` recipe:

    - "basic" (``sampler_input``: the normalised image): on each patch, bias field,
      intensity scale/shift, gamma and noise of the normalised values (the recipe of
      the models before issue 13, kept as it was so that their runs keep their meaning);
    - "robust" (the unnormalised image): ``augment.robust_transforms`` on the whole
      case (contrast, bias field, noise, simulated acquisition at 1-2 mm or in 3-5 mm
      slices, then the inference normalisation), then the patches and flips.
      ``spacing``: the model grid (mm), ``normalisation``: the card's normalisation."""
    keys = ["image", "label"]
    crop = [
        RandCropByLabelClassesd(keys, label_key="label", spatial_size=tuple(patch_size), num_classes=num_classes,
                                ratios=list(class_ratios), num_samples=samples, allow_smaller=False),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
    ]
    if check_augmentation(augmentation) == "robust":
        return Compose([*robust_transforms(spacing, normalisation), *crop])
    return Compose([
        *crop,
        RandBiasFieldd("image", prob=0.3, coeff_range=(0.0, 0.2)),
        RandScaleIntensityd("image", factors=0.15, prob=0.5),
        RandShiftIntensityd("image", offsets=0.15, prob=0.5),
        RandAdjustContrastd("image", prob=0.2, gamma=(0.8, 1.25)),
        RandGaussianNoised("image", prob=0.15, std=0.05),
    ])


def _random_states(transform) -> list[np.random.RandomState]:
    """Every RandomState that ``transform`` and the transforms inside it draw from
    (a dictionary transform draws from its own and from its array transform's), once
    each, in a fixed order: attribute order is construction order."""
    states, seen = [], set()

    def visit(obj) -> None:
        if isinstance(obj, Randomizable) and id(obj.R) not in seen:
            seen.add(id(obj.R))
            states.append(obj.R)
        for value in vars(obj).values():
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, (Transform, Randomizable)):
                    visit(item)

    visit(transform)
    return states


def sampler_state(transform) -> list:
    """The random state of the patch sampler (``training_transforms``): saved in a
    checkpoint so that a resumed run draws the very patches an uninterrupted one would."""
    return [state.get_state() for state in _random_states(transform)]


def set_sampler_state(transform, states: list) -> None:
    """Put back what ``sampler_state`` returned (for the same transforms)."""
    own = _random_states(transform)
    if len(own) != len(states):
        raise InputError(f"last.pt holds the state of {len(states)} random transforms, this run's sampler has "
                         f"{len(own)}: it belongs to another training setup (start afresh without --resume)")
    for state, saved in zip(own, states):
        state.set_state(saved)
