"""Brain extraction: is a T1 already skull-stripped, and if not, where is its brain.

``is_skull_stripped(scan)`` decides from the image alone (the rule is in its docstring);
``BrainExtractor`` runs deepbet (Fisch et al. 2024, "deepbet: Fast brain extraction of T1-
weighted MRI using Convolutional Neural Networks", MIT licence; its TorchScript weights
ship inside the ``deepbet`` wheel) in this process on the array psc already holds: no
temporary files, the models loaded once per command on psc's device.

deepbet crops the bounding box its small model finds and resamples that crop to 256^3
(nearest-exact) whatever the voxel size, so a coarse scan (mrtrix's 1.8 mm) reaches its
network as blocky steps. ``BrainExtractor(resample=True)`` first resamples a scan coarser
than ``RESAMPLE_ABOVE_MM`` to ``WORKING_SPACING_MM`` (trilinear) and brings the
probability map back the same way; measured on mrtrix-sub01 against its brain mask it
does not help (Dice 0.9688 resampled vs 0.9694 as is, docs/mri.md), so it is off by default.
The mask is then thresholded at 0.5 on the input grid, its largest component kept and its
voids filled (deepbet's own postprocessing), and returned on the input's voxels exactly
(RAS canonical is a permutation and flips of the voxel axes, undone exactly).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from psc.utils.errors import InputError

from .io import Scan

SKULL_STRIP_MODES = ("auto", "on", "off")
RESAMPLE_ABOVE_MM = 1.3  # a voxel axis coarser than this is resampled before deepbet runs
WORKING_SPACING_MM = 1.0
THRESHOLD = 0.5

# is_skull_stripped's rule (see its docstring)
MIN_BACKGROUND_FRACTION = 0.30
MAX_BRAIN_LITRES = 2.6
BRIGHT_FACTOR = 2.5  # "bright": above this many times the non-background's median
MAX_BRIGHT_FRACTION = 0.01


def _background(array: np.ndarray) -> tuple[float, np.ndarray]:
    """The constant a skull-stripped scan fills its background with (0, or the minimum
    when that is more common) and where the scan holds exactly that value."""
    zero = array == 0
    low = float(array.min())
    if low != 0:
        at_min = array == low
        if at_min.sum() > zero.sum():
            return low, at_min
    return 0.0, zero


def is_skull_stripped(scan: Scan) -> tuple[bool, str]:
    """Whether ``scan`` already shows only the brain, and why, in one phrase.

    The rule, three conditions, all needed for "stripped":

    1. at least ``MIN_BACKGROUND_FRACTION`` (30 %) of the voxels hold one constant
       background value (0, or the minimum): skull stripping sets everything outside the
       brain to a constant, whereas a head scan has noise (never exactly constant) in the
       air around the head and scalp, skull and neck inside it. (A brain, 1.1-2 L, in a
       usual field of view of 3-9 L leaves 50-85 % background; IBSR 90 %, MNI152 80 %.)
    2. the rest (the non-background voxels) is at most ``MAX_BRAIN_LITRES`` (2.6 L):
       an intracranial volume is 1.1-2.0 L in adults (see ``plausibility``), a whole
       head 3-5 L, so a head whose air was zeroed (some defacing and conversion tools do
       that) is not taken for a brain.
    3. at most ``MAX_BRIGHT_FRACTION`` (1 %) of the non-background voxels are brighter
       than ``BRIGHT_FACTOR`` (2.5x) its median. In a T1 brain white matter, the
       brightest tissue, is 1.2-1.5x the median (at most 2x in a synthetic phantom);
       what is far brighter is fat, marrow or skull that a stripping tool left around
       the brain (a bright shell), which psc would otherwise z-score with the brain and
       label as tissue. Measured: no IBSR scan or MNI152 has a voxel above 2x its
       median in more than 0.01 % of its brain; a 2-voxel shell at 2.5x the brain's 99th
       percentile around IBSR_07 is 9.7 % (deepbet then removes it). Only for
       non-negative intensities (magnitude images; a scan already z-scored has a median
       near 0). Residual tissue only a little brighter than white matter passes this
       rule: the plausibility check is the net for it.

    Tissue touching the field of view is deliberately not used: a stripped template such
    as MNI152 has its brainstem cut by the bottom face."""
    array = np.asarray(scan.array)
    value, background = _background(array)
    fraction = float(background.mean())
    litres = float((~background).sum()) * scan.voxel_volume / 1e6
    if fraction < MIN_BACKGROUND_FRACTION:
        return False, (f"only {100 * fraction:.1f} % of the voxels are a constant background "
                       f"(a skull-stripped scan has at least {100 * MIN_BACKGROUND_FRACTION:.0f} %)")
    if litres > MAX_BRAIN_LITRES:
        return False, (f"the non-background region is {litres:.2f} L, more than a brain "
                       f"(at most {MAX_BRAIN_LITRES} L): a head with its air zeroed")
    inside = array[~background]
    bright = 0.0
    if inside.size and float(np.percentile(inside, 1)) >= 0:
        bright = float((inside > BRIGHT_FACTOR * np.median(inside)).mean())
    if bright > MAX_BRIGHT_FRACTION:
        return False, (f"{100 * bright:.1f} % of the non-background voxels are brighter than {BRIGHT_FACTOR:g}x "
                       f"its median (a stripped T1 brain has at most {100 * MAX_BRIGHT_FRACTION:g} %): fat, "
                       "marrow or skull left around the brain")
    return True, (f"{100 * fraction:.1f} % constant background ({value:g}) around a {litres:.2f} L "
                  "non-background region: already skull-stripped")


def background_mask(scan: Scan) -> Scan | None:
    """The brain of a scan psc does not extract: everything but its constant background.
    ``None`` when that background is 0, since "the nonzero voxels" (segment_scan's
    default) is then the same region; a mask when a stripping tool filled the
    background with another constant (-100, -1024, the minimum), which would otherwise
    be z-scored and segmented as tissue."""
    value, background = _background(np.asarray(scan.array))
    if value == 0 or bool(background.all()):
        return None
    return Scan(scan.path.with_name(f"{scan.stem}_desc-nonbackground_mask.nii.gz"),
                (~background).astype(np.uint8), scan.affine, scan.header)


@dataclass(frozen=True)
class SkullStripDecision:
    mode: str  # auto, on, off, or "mask" (a --mask was given)
    extract: bool  # whether psc runs brain extraction on this scan
    reason: str


def decide(scan: Scan, mode: str, mask_given: bool = False) -> SkullStripDecision:
    """``--skull-strip MODE`` for one scan: a given mask overrides every mode."""
    if mode not in SKULL_STRIP_MODES:
        raise InputError(f"--skull-strip must be one of {', '.join(SKULL_STRIP_MODES)}, got {mode!r}")
    if mask_given:
        return SkullStripDecision("mask", False, "a brain mask was given (--mask)")
    if mode == "on":
        return SkullStripDecision(mode, True, "--skull-strip on")
    if mode == "off":
        return SkullStripDecision(mode, False, "--skull-strip off: the nonzero voxels are taken as the brain")
    stripped, reason = is_skull_stripped(scan)
    return SkullStripDecision(mode, not stripped, reason)


@dataclass
class BrainMask:
    """A brain mask on the input scan's grid (bool, the scan's shape) and how long it took."""

    mask: np.ndarray
    seconds: float
    resampled: bool  # whether the scan was resampled to WORKING_SPACING_MM first

    @property
    def voxels(self) -> int:
        return int(self.mask.sum())


def _ras_orientation(affine: np.ndarray):
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.axcodes2ornt("RAS")
    return nib.orientations.ornt_transform(ornt, ras), nib.orientations.ornt_transform(ras, ornt), ornt


class BrainExtractor:
    """deepbet's two networks, loaded once (per command) on ``device``; ``extract(scan)``
    per scan. ``resample``: bring coarse scans to ``WORKING_SPACING_MM`` first."""

    def __init__(self, device: str = "cpu", resample: bool = False) -> None:
        import torch

        from ..devices import resolve_device

        try:
            from deepbet import BrainExtraction
        except ImportError:  # pragma: no cover - a dependency, but say what is missing
            raise InputError("brain extraction needs the deepbet package: pip install deepbet==1.0.2") from None
        self.device = torch.device(str(resolve_device(device)))
        # no_gpu=True: load on the CPU, whatever deepbet picked at import; then psc's device.
        self.bet = BrainExtraction(no_gpu=True, model_path=None, bbox_model_path=None)
        self.bet.model.to(self.device)
        self.bet.bbox_model.to(self.device)
        self.resample = resample

    def probability(self, array: np.ndarray, zooms: np.ndarray) -> tuple[np.ndarray, bool]:
        """deepbet's brain probability on a RAS-canonical array (float32, same shape)."""
        import torch
        import torch.nn.functional as F

        x = np.ascontiguousarray(array, dtype=np.float32)
        resampled = self.resample and bool(np.any(zooms > RESAMPLE_ABOVE_MM))
        if not resampled:
            return self.bet.run_model(x), False
        size = tuple(max(8, int(round(n * z / WORKING_SPACING_MM))) for n, z in zip(x.shape, zooms))
        fine = F.interpolate(torch.from_numpy(x)[None, None], size=size, mode="trilinear", align_corners=False)
        prob = self.bet.run_model(fine[0, 0].numpy())
        back = F.interpolate(torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[None, None],
                             size=x.shape, mode="trilinear", align_corners=False)
        return back[0, 0].numpy(), True

    def extract(self, scan: Scan) -> BrainMask:
        """The brain of ``scan`` on its own grid; a scan deepbet cannot work on (too
        little foreground, a constant image) is one ``InputError``."""
        import nibabel as nib
        from nibabel.affines import voxel_sizes

        started = time.perf_counter()
        to_ras, from_ras, ornt = _ras_orientation(scan.affine)
        array = np.nan_to_num(np.asarray(scan.array, dtype=np.float32))
        ras = nib.orientations.apply_orientation(array, to_ras)
        zooms = voxel_sizes(scan.affine)[ornt[:, 0].argsort()]
        try:
            prob, resampled = self.probability(ras, zooms)
            mask = prob > THRESHOLD
            if not mask.any():
                raise AssertionError("no brain found")
            self.bet.bbox = tuple(slice(0, n) for n in mask.shape)  # postprocess the whole grid
            mask = self.bet.postprocess(mask)
        except (AssertionError, ValueError, RuntimeError) as error:
            raise InputError(f"brain extraction failed ({error or type(error).__name__}); "
                             "give a brain mask with --mask, or --skull-strip off for a skull-stripped scan") from None
        mask = nib.orientations.apply_orientation(np.asarray(mask, dtype=bool), from_ras)
        return BrainMask(np.ascontiguousarray(mask, dtype=bool), time.perf_counter() - started, resampled)

    def mask_scan(self, scan: Scan, brain: BrainMask) -> Scan:
        """``brain`` as a Scan on ``scan``'s grid (what ``segment_scan(mask=)`` takes)."""
        return Scan(scan.path.with_name(f"{scan.stem}_desc-brain_mask.nii.gz"), brain.mask.astype(np.uint8),
                    scan.affine, scan.header)


@dataclass
class BrainStep:
    """What the brain step decided for one scan: the decision, the mask to segment with
    (``None``: the nonzero voxels), whether psc extracted it, and how long that took."""

    decision: SkullStripDecision
    mask: Scan | None
    extracted: bool = False
    seconds: float = 0.0

    def record(self) -> dict:
        """The ``SkullStrip`` entry of the ``_dseg.json`` sidecar."""
        return {"Mode": self.decision.mode, "Extracted": self.extracted, "Reason": self.decision.reason,
                "Method": "deepbet 1.0.2 (threshold 0.5, largest component, voids filled)" if self.extracted
                else None, "Seconds": round(self.seconds, 2) if self.extracted else None}


class BrainStage:
    """The brain step of a command: ``--skull-strip MODE`` and an optional given mask;
    deepbet is loaded on the first scan that needs it, then reused (once per command)."""

    def __init__(self, mode: str = "auto", mask: Scan | None = None, device: str = "cpu",
                 extractor_factory: Callable[[str], BrainExtractor] | None = None) -> None:
        if mode not in SKULL_STRIP_MODES:
            raise InputError(f"--skull-strip must be one of {', '.join(SKULL_STRIP_MODES)}, got {mode!r}")
        self.mode, self.mask, self.device = mode, mask, device
        self.factory = extractor_factory or BrainExtractor  # a long-lived caller (napari) passes a cached one
        self._extractor: BrainExtractor | None = None

    @property
    def may_extract(self) -> bool:
        return self.mask is None and self.mode != "off"

    def extractor(self) -> BrainExtractor:
        if self._extractor is None:
            self._extractor = self.factory(self.device)
        return self._extractor

    def __call__(self, scan: Scan) -> BrainStep:
        decision = decide(scan, self.mode, self.mask is not None)
        if not decision.extract:
            return BrainStep(decision, self.mask if self.mask is not None else background_mask(scan))
        extractor = self.extractor()
        brain = extractor.extract(scan)
        return BrainStep(decision, extractor.mask_scan(scan, brain), True, brain.seconds)
