"""Scan -> tissue labels on the scan's own grid.

The network sees the scan in model space (the card's orientation and spacing,
intensities normalised, cropped to the brain); MONAI's sliding-window inferer runs
windows on the chosen device and blends them with gaussian weights into a volume
kept in CPU memory; the class probabilities are then resampled onto the input grid
through the two affines (MONAI ``SpatialResample``), and only then turned into
labels, so the output lies exactly on the input's voxels.

Window size: a brain cropped in model space is about 150 x 125 x 150 voxels, which a
fully convolutional network can take in one piece. Tiling it into 96^3 windows with
25 % overlap computes about 2.5x as many voxels, and the overlap is pure cost: the
single window scores as well (docs/results-mri.md). So ``window=None`` runs the whole
crop as one window when it has at most ``config.WHOLE_WINDOW_MAX_VOXELS`` voxels, and
falls back to ``config.INFERENCE_WINDOW`` tiles for larger inputs (memory then
depends on the window, not on the scan).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import SpatialResample
from torch import nn

from psc.models.weights import ModelCard
from psc.utils.errors import InputError

from ..devices import resolve_device  # noqa: F401  (re-exported: callers check a device before loading)
from ..inference import InferenceNetwork, prepare_network
from . import config
from .io import Scan
from .preprocess import brain_bbox, normaliser, to_meta, to_model_space


@dataclass
class Segmentation:
    """Both arrays lie on the input scan's voxel grid. Probabilities are channel-first
    (the layout the network and MONAI use); ``outputs`` moves the class axis last for
    the 4-D probseg NIfTI, where the 4th axis is the volume index."""

    labels: np.ndarray  # uint8, the input's shape
    probabilities: np.ndarray  # float32, (classes, *input shape), summing to 1 per voxel
    precision: str = "fp32"  # what the network ran in
    windows: int = 1  # how many sliding windows it took


class _Softmax(nn.Module):
    """The network as the inferer sees it: probabilities, optionally averaged with the
    left-right mirrored prediction (flip test-time augmentation), in fp32 whatever
    precision the network runs in."""

    def __init__(self, network: InferenceNetwork, tta: bool, on_window: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.network, self.tta, self.on_window = network, tta, on_window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_window is not None:
            self.on_window()
        probs = torch.softmax(self.network(x).float(), dim=1)
        if self.tta:  # axis 2 is left-right in RAS model space
            probs = 0.5 * (probs + torch.softmax(self.network(x.flip(2)).float(), dim=1).flip(2))
        return probs


def window_count(shape: Sequence[int], window: Sequence[int], overlap: float) -> int:
    """How many windows the sliding-window inferer runs over ``shape`` (MONAI's rule:
    steps of int(window * (1 - overlap)), the last window flush with the end), so a
    progress bar can show a total before the first window."""
    count = 1
    for size, roi in zip(shape, window):
        step = max(int(roi * (1 - overlap)), 1)
        count *= 1 if size <= roi else math.ceil((size - roi) / step) + 1
    return count


def choose_window(shape: Sequence[int], window: Sequence[int] | None = None) -> tuple[int, ...]:
    """The sliding window for a model-space crop of ``shape``: ``window`` if given,
    else the whole crop when it is small enough, else ``config.INFERENCE_WINDOW``;
    never larger than the crop."""
    if window is None:
        whole = math.prod(shape) <= config.WHOLE_WINDOW_MAX_VOXELS
        window = tuple(shape) if whole else config.INFERENCE_WINDOW
    if len(window) != len(shape) or min(window) < 1:
        raise InputError(f"window {tuple(window)} does not fit a {len(shape)}-D volume")
    return tuple(min(int(w), s) for w, s in zip(window, shape))


@dataclass
class ModelSpaceInput:
    """A scan as the network sees it: ``image`` (the whole scan in model space, with its
    affine), ``crop`` (normalised, cut to the brain's bounding box ``box``, batch and
    channel first) and the brain mask in model space when one was given."""

    image: MetaTensor
    crop: torch.Tensor
    box: tuple[slice, ...]
    brain: torch.Tensor | None


def preprocess(scan: Scan, card: ModelCard, mask: Scan | None = None) -> ModelSpaceInput:
    """Scan -> model space (the card's orientation and spacing), normalised as the card
    says over the brain (``mask``, else the nonzero voxels), cropped to the brain."""
    if mask is not None and mask.array.shape != scan.array.shape:
        raise InputError(f"mask shape {mask.array.shape} differs from the scan's {scan.array.shape}")
    if mask is not None and not np.allclose(mask.affine, scan.affine, atol=1e-3):
        raise InputError(f"mask {mask.path.name} lies on a different grid than {scan.path.name} (affines differ)")
    normalise = normaliser(card.normalisation)
    image = to_model_space(to_meta(scan.array.astype(np.float32), scan.affine), card.spacing, card.orientation)
    brain_ms = None
    if mask is not None:
        brain_ms = to_model_space(to_meta((mask.array > 0).astype(np.float32), scan.affine), card.spacing,
                                  card.orientation, label=True).as_tensor() > 0.5
        if not bool(brain_ms.any()):
            raise InputError(f"mask {mask.path.name} is empty after resampling to the model's grid")
    x = normalise(image.as_tensor(), brain_ms)
    box = brain_bbox(brain_ms.float() if brain_ms is not None else x, config.INFERENCE_CROP_MARGIN)
    return ModelSpaceInput(image, x[(slice(None), *box)][None], box, brain_ms)


def predict(prepared: ModelSpaceInput, network: InferenceNetwork, overlap: float = 0.25, tta: bool = False,
            window: Sequence[int] | None = None, progress: bool = False,
            on_window: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, int]:
    """Class probabilities (fp32, on the CPU) of the whole model-space grid, background
    outside the crop, and the number of sliding windows it took."""
    crop = prepared.crop
    window = choose_window(crop.shape[2:], window)
    inferer = SlidingWindowInferer(roi_size=window, sw_batch_size=1, overlap=overlap, mode="gaussian",
                                   sw_device=network.device, device=torch.device("cpu"), progress=progress)
    windows = window_count(crop.shape[2:], window, overlap)
    tick = None
    if on_window is not None:
        done = itertools.count(1)
        tick = lambda: on_window(next(done), windows)  # noqa: E731
    with torch.inference_mode():
        probs_crop = inferer(crop, _Softmax(network, tta, tick))[0]
    grid = prepared.image.shape[1:]
    probs = torch.zeros((probs_crop.shape[0], *grid), dtype=torch.float32)
    probs[0] = 1.0  # outside the crop: background
    probs[(slice(None), *prepared.box)] = probs_crop.float()
    return probs, windows


def segment_scan(scan: Scan, model: nn.Module | InferenceNetwork, card: ModelCard, device: str = "auto",
                 overlap: float = 0.25, tta: bool = False, mask: Scan | None = None, precision: str = "auto",
                 window: Sequence[int] | None = None, progress: bool = False,
                 on_window: Callable[[int, int], None] | None = None) -> Segmentation:
    """Labels and probabilities on ``scan``'s grid: :func:`preprocess` ->
    :func:`predict` -> :func:`to_input_grid`. Probabilities, not labels, are resampled
    back, so a boundary between two model voxels lands where the evidence crosses over,
    not on the nearest model voxel. ``mask`` (same grid as ``scan``) replaces the nonzero
    voxels as the brain; outside it every label is background.

    ``model``: a network from ``psc.pipelines.inference.prepare_network`` (prepared once
    for many scans: ``device`` and ``precision`` are then its own), or a plain module,
    prepared here for this one call on ``device`` in ``precision`` (``auto``, ``fp32``,
    ``bf16``, ``fp16``). ``window`` is the sliding window in model voxels (default: see
    the module doc). ``progress`` shows MONAI's own tqdm bar; ``on_window(done, total)``
    is called as each window starts, for a caller's own progress display."""
    if not 0 <= overlap < 1:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    network = model if isinstance(model, InferenceNetwork) else prepare_network(model, device, precision)
    prepared = preprocess(scan, card, mask)
    probs, windows = predict(prepared, network, overlap, tta, window, progress, on_window)
    probabilities = to_input_grid(probs, prepared.image.affine, prepared.box, scan)
    labels = probabilities.argmax(0).astype(np.uint8)
    brain = (mask.array > 0) if mask is not None else (scan.array != 0)
    labels[~brain] = 0
    return Segmentation(labels, probabilities, network.precision, windows)


def to_input_grid(probs: torch.Tensor, model_affine, box: Sequence[slice], scan: Scan) -> np.ndarray:
    """Model-space class probabilities resampled onto the scan's grid (bilinear).

    Outside the crop ``box`` every model voxel is pure background, and interpolating
    pure background gives pure background, so only the input voxels near the crop are
    resampled: the crop grown by one model voxel (the interpolation's reach), mapped
    into input voxels through the two affines, plus one input voxel. That is about half
    the input grid for an IBSR scan, and resampling the whole grid took about 1 s of a
    4-5 s scan. "border" padding: an input voxel centre a fraction of a voxel beyond the
    model grid's last centre takes the edge value instead of fading to all-zero
    probabilities; a crop that reaches the grid's edge keeps that edge in the block, and
    the block's own edge elsewhere is background, as the whole grid's is there."""
    model_affine = np.asarray(model_affine, dtype=np.float64)
    grid = probs.shape[1:]
    start = np.array([max(0, b.start - 1) for b in box])
    stop = np.array([min(n, b.stop + 1) for b, n in zip(box, grid)])
    # The hull one model voxel beyond the block on every side: it holds every input
    # voxel whose value the block decides, those a fraction of a voxel beyond the model
    # grid's edge included, whatever the orientation of one grid to the other.
    corners = np.array([[(stop if bit else start - 1)[axis] for axis, bit in
                         enumerate(((i >> 2) & 1, (i >> 1) & 1, i & 1))] for i in range(8)], dtype=np.float64)
    model_to_input = np.linalg.inv(scan.affine) @ model_affine
    at = corners @ model_to_input[:3, :3].T + model_to_input[:3, 3]
    shape = np.array(scan.array.shape[:3])
    low = np.clip(np.floor(at.min(0)).astype(int) - 1, 0, shape)
    high = np.clip(np.ceil(at.max(0)).astype(int) + 2, 0, shape)

    out = np.zeros((probs.shape[0], *shape), dtype=np.float32)
    out[0] = 1.0
    if np.any(high <= low):
        return out
    source_affine = model_affine.copy()
    source_affine[:3, 3] += model_affine[:3, :3] @ start
    target_affine = np.asarray(scan.affine, dtype=np.float64).copy()
    target_affine[:3, 3] += target_affine[:3, :3] @ low
    source = probs[(slice(None), *(slice(a, b) for a, b in zip(start, stop)))].contiguous()
    block = SpatialResample(mode="bilinear", padding_mode="border")(
        MetaTensor(source, affine=torch.as_tensor(source_affine)), dst_affine=torch.as_tensor(target_affine),
        spatial_size=tuple(int(v) for v in high - low))
    out[(slice(None), *(slice(a, b) for a, b in zip(low, high)))] = block.as_tensor().numpy()
    return out
