"""``psc-segment``'s options for MRI scans, with their defaults: the one place they are
written (the command line's defaults and ``--help`` are built from these fields)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..options import SegmentOptions, own_options

SAMPLE_OUTPUT = Path("psc-sample-output")  # where psc-segment --sample writes, and psc-view --sample looks


@dataclass(frozen=True)
class MRISegmentOptions(SegmentOptions):
    window: tuple[int, int, int] | None = None  # sliding window in model voxels; None: auto (inference.choose_window)
    overlap: float = 0.25  # sliding-window overlap, in [0, 1)
    tta: bool = False  # average with the left-right mirrored prediction
    mask: Path | None = None  # brain mask on the scan's grid; overrides skull_strip
    skull_strip: str = "auto"  # auto (brain.is_skull_stripped decides), on (deepbet), off (the nonzero voxels)
    probabilities: bool = False  # also write <stem>_probseg.nii.gz


MRI_ONLY = own_options(MRISegmentOptions)  # options the EM pipeline refuses
