"""MRI robustness: IBSR validation scans as other scanners would deliver them, and a raw
skull-on scan, through psc-segment's own path.

    python benchmarks/mri_robustness.py [--weights W.pt ...] [--scans IBSR_07 IBSR_16]
                                        [--threads 1] [--markdown FILE] [--out DIR]

Rows, per weights file (default: the shipped MRI model):

* IBSR scans (``--scans``, default the validation pair 07 and 16), as they are and as
  variants written to NIfTI (with their own affine) and segmented at their own grid:
  ``3mm`` (3 mm isotropic), ``thick-slice`` (1 x 1 x 5 mm, 5 mm along the scan's own
  1.5 mm slice axis, coronal), ``thick-axial`` (1 x 1 x 5 mm, 5 mm along the axial axis)
  and ``bias+gamma`` (the original grid, a smooth multiplicative bias field and a gamma
  curve, fixed seed). Going coarser is partial volume, not subsampling: the image is
  blurred with the acquisition point-spread function of the robust training recipe
  (``augment.acquisition_sigma``, SynthSeg's Gaussian of 0.75 voxel), sampled on the
  coarse grid (trilinear) and skull-stripped there (the blurred brain mask >= 0.5), as
  ``augment.simulate_acquisition`` does it. Dice against the manual labels resampled
  onto the variant's grid with nearest neighbour.
* mrtrix-sub01, the raw skull-on T1 (``--skull-strip auto``: deepbet) and, to separate
  brain extraction from tissue labelling, the same scan with its provided brain mask.
  Dice is agreement with FreeSurfer's aparc+aseg (mapped to tissue as the data README
  says, cortical parcels 1000-2999 as GM; nearest neighbour onto the T1 grid through
  the affines), computed inside FreeSurfer's labelled voxels (its CSF is the ventricles
  only): agreement, not accuracy. "outside mask": the share of psc's labelled volume
  outside ``sub-01_brainmask.nii.gz``.

"seconds": brain step (deepbet when it runs) + ``segment_scan``, one run, no warm-up.
"warnings": how many plausibility warnings psc-segment would print (listed below the
table). ``--out DIR`` keeps each variant scan and psc-segment's outputs for it (``_dseg``,
``_qc.png``, ...). Skips in one line when ../shared/data is absent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.affines import voxel_sizes
from rich.console import Console
from rich.table import Table
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from psc.models.shipped import ShippedWeights  # noqa: E402
from psc.models.weights import MRI_TISSUE  # noqa: E402
from psc.pipelines.inference import load_network  # noqa: E402
from psc.pipelines.mri.augment import acquisition_sigma  # noqa: E402
from psc.pipelines.mri.brain import BrainStage  # noqa: E402
from psc.pipelines.mri.inference import segment_scan  # noqa: E402
from psc.pipelines.mri.io import Scan, read_scan, write_nifti  # noqa: E402
from psc.pipelines.mri.metrics import dice_per_class  # noqa: E402
from psc.pipelines.mri.options import MRISegmentOptions  # noqa: E402
from psc.pipelines.mri.outputs import output_paths, write_outputs  # noqa: E402
from psc.pipelines.mri.plausibility import check as plausibility  # noqa: E402
from psc.pipelines.precision import PRECISIONS  # noqa: E402

from machine import machine_line  # noqa: E402  (benchmarks/, first on sys.path)
from mri import IBSR, truth_for  # noqa: E402

MRTRIX = ROOT.parent / "shared" / "data" / "mrtrix-sub01"
CLASSES = (1, 2, 3)  # CSF, GM, WM
SEED, BIAS_COEFF, GAMMA = 0, 0.2, 1.5
# FreeSurfer aseg -> tissue (shared/data/README.md); aparc+aseg's cortex is 1000-2999.
FREESURFER = {1: {4, 5, 14, 15, 24, 43, 44, 72, 31, 63},
              2: {3, 42, 8, 47, 10, 11, 12, 13, 17, 18, 26, 28, 49, 50, 51, 52, 53, 54, 58, 60},
              3: {2, 41, 7, 46, 16, 77, 85, 251, 252, 253, 254, 255}}
COLUMNS = ("weights", "scan", "input", "grid (mm)", "brain", "seconds", "Dice CSF", "Dice GM", "Dice WM",
           "Dice mean", "CSF / GM / WM ml", "outside mask", "warnings")


# --- resampling (benchmark helpers) -------------------------------------------------------

def grid_for(shape, affine: np.ndarray, voxel) -> tuple[tuple[int, ...], np.ndarray]:
    """The grid covering the same field of view as (``shape``, ``affine``) with voxels of
    ``voxel`` mm along the same voxel axes: its shape and affine (new voxel j's centre
    at old voxel coordinate (j + 0.5) r - 0.5, r = new / old size)."""
    ratio = np.asarray(voxel, float) / voxel_sizes(affine)
    new_shape = tuple(max(2, int(round(n / r))) for n, r in zip(shape, ratio))
    to_old = np.eye(4)
    to_old[:3, :3] = np.diag(ratio)
    to_old[:3, 3] = (ratio - 1) / 2
    return new_shape, affine @ to_old


def sample(array: np.ndarray, affine: np.ndarray, shape, new_affine: np.ndarray, order: int) -> np.ndarray:
    """``array`` (on ``affine``) sampled at the voxel centres of (``shape``, ``new_affine``)
    through world coordinates: order 0 nearest neighbour (labels), 1 trilinear; 0 outside."""
    to_src = np.linalg.inv(affine) @ new_affine
    return ndimage.affine_transform(array, to_src[:3, :3], to_src[:3, 3], output_shape=tuple(shape), order=order,
                                    mode="constant", cval=0)


def acquire(scan: Scan, voxel) -> Scan:
    """``scan`` (skull-stripped) as acquired with ``voxel`` mm voxels: blurred by the
    point-spread function, sampled on the coarse grid, skull-stripped there."""
    image = scan.array.astype(np.float32)
    sigma = acquisition_sigma(voxel_sizes(scan.affine), voxel)  # in the scan's voxels; 0 where not coarser
    blur = lambda x: ndimage.gaussian_filter(x, sigma, mode="nearest", truncate=3.0)  # noqa: E731
    shape, affine = grid_for(image.shape, scan.affine, voxel)
    coarse = sample(blur(image), scan.affine, shape, affine, order=1)
    brain = sample(blur((image != 0).astype(np.float32)), scan.affine, shape, affine, order=1) >= 0.5
    return Scan(scan.path, np.where(brain, np.clip(coarse, 0, None), 0).astype(np.float32), affine)


def bias_and_gamma(scan: Scan, seed: int = SEED) -> tuple[Scan, tuple[float, float]]:
    """``scan`` with gamma ``GAMMA`` on [0, max], then a smooth multiplicative bias field
    (MONAI's degree-3 Legendre log field, coefficients uniform in +-``BIAS_COEFF``, seeded):
    the scan and the field's range inside the brain."""
    from monai.transforms import RandBiasField

    image = np.clip(scan.array.astype(np.float32), 0, None)
    top = float(image.max())
    image = top * (image / top) ** GAMMA
    field = RandBiasField(degree=3, coeff_range=(-BIAS_COEFF, BIAS_COEFF), prob=1.0)
    field.set_random_state(seed)
    biased = np.asarray(field(image[None]))[0]
    brain = image > 0
    ratio = biased[brain] / image[brain]
    return Scan(scan.path, biased.astype(np.float32), scan.affine), (float(ratio.min()), float(ratio.max()))


VARIANTS = {  # name -> (voxel sizes in mm for the scan's voxel axes, or None: the original grid)
    "original": None,
    "3mm": (3.0, 3.0, 3.0),
    "thick-slice": (1.0, 5.0, 1.0),  # IBSR's slice axis (1.5 mm, coronal) is the second voxel axis
    "thick-axial": (1.0, 1.0, 5.0),  # the third voxel axis is S (RAS header): 5 mm axial slices
    "bias+gamma": None,
}


# --- rows --------------------------------------------------------------------------------

def freesurfer_tissue(path: Path, like: Scan) -> np.ndarray:
    """aparc+aseg mapped to CSF/GM/WM (0: not one of them), nearest neighbour onto ``like``."""
    image = nib.load(str(path))
    labels = np.asarray(image.dataobj).astype(np.int32)
    tissue = np.zeros(labels.shape, np.uint8)
    for cls, values in FREESURFER.items():
        tissue[np.isin(labels, list(values))] = cls
    tissue[(labels >= 1000) & (labels < 3000)] = 2  # cortical parcels (aparc replaces 3/42)
    return sample(tissue, image.affine, like.array.shape, like.affine, order=0)


def fmt(scores: dict[int, float]) -> list[str]:
    values = [scores[c] for c in CLASSES]
    return [f"{v:.3f}" for v in values] + [f"{np.nanmean(values):.3f}"]


def segment(scan_path: Path, network, brain_stage: BrainStage, args, keep: Path | None):
    """psc-segment's path on one file: read, brain step, segment; outputs under ``keep``."""
    scan = read_scan(scan_path)
    start = time.perf_counter()
    brain = brain_stage(scan)
    seg = segment_scan(scan, network, network.card, overlap=args.overlap, mask=brain.mask, window=None)
    seconds = time.perf_counter() - start
    mask = brain.mask.array if brain.mask is not None else None
    warnings = plausibility(seg.labels, network.card.labels, scan.voxel_volume, mask, scan.voxel_sizes)
    if keep is not None:
        paths = output_paths(scan_path, keep, False, brain.extracted)
        write_outputs(seg, scan, paths, network.card.labels, mask, {"SkullStrip": brain.record(),
                                                                    "Warnings": warnings})
    step = "deepbet" if brain.extracted else ("given mask" if brain.decision.mode == "mask" else "as is")
    return scan, seg, seconds, step, warnings


def describe(scan: Scan, seg, seconds: float, step: str, warnings: list[str]) -> list[str]:
    """The columns every row shares: grid, brain step, time, volumes, warnings."""
    counts = np.bincount(seg.labels.ravel(), minlength=4)
    ml = " / ".join(f"{counts[c] * scan.voxel_volume / 1000:.0f}" for c in CLASSES)
    grid = " x ".join(f"{v:.2g}" for v in voxel_sizes(scan.affine))
    return [grid, step, f"{seconds:.1f}", ml, str(len(warnings))]


def ibsr_rows(name: str, network, args, work: Path, keep: Path | None, notes: list[str]) -> list[list[str]]:
    rows = []
    brain_stage = BrainStage("auto", None, str(network.device))
    for case in args.scans:
        path = IBSR / case / f"{case}.nii.gz"
        original, truth = read_scan(path), read_scan(truth_for(path), labels=True).array
        for variant, voxel in VARIANTS.items():
            if variant == "original":
                variant_path, labels = path, truth
            else:
                if voxel is None:
                    scan, (low, high) = bias_and_gamma(original)
                    notes.append(f"{case} bias+gamma: gamma {GAMMA}, bias field x{low:.2f}-x{high:.2f} in the brain")
                else:
                    scan = acquire(original, voxel)
                variant_path = (keep or work) / f"{case}_{variant.replace('+', '-')}.nii.gz"
                write_nifti(scan.array, scan.affine, variant_path, dtype=np.float32)
                labels = truth if voxel is None else sample(truth, original.affine, scan.array.shape, scan.affine, 0)
            scan, seg, seconds, step, warnings = segment(variant_path, network, brain_stage, args, keep)
            notes += [f"{case} {variant}: {w}" for w in warnings]
            grid, step, sec, ml, warn = describe(scan, seg, seconds, step, warnings)
            rows.append([name, case, variant, grid, step, sec, *fmt(dice_per_class(seg.labels, labels, CLASSES)),
                         ml, "-", warn])
    return rows


def mrtrix_rows(name: str, network, args, keep: Path | None, notes: list[str]) -> list[list[str]]:
    t1, mask_path = MRTRIX / "sub-01_T1w.nii.gz", MRTRIX / "sub-01_brainmask.nii.gz"
    given = read_scan(mask_path, labels=True)
    rows = []
    for label, folder, mask in (("raw, skull-strip auto", "sub-01_auto", None),
                                ("raw, --mask brainmask", "sub-01_mask", given)):
        stage = BrainStage("auto", mask, str(network.device))
        scan, seg, seconds, step, warnings = segment(t1, network, stage, args, keep / folder if keep else None)
        notes += [f"sub-01 {label}: {w}" for w in warnings]
        fs = freesurfer_tissue(MRTRIX / "aparc+aseg.mgz", scan)
        inside = np.where(fs > 0, seg.labels, 0)  # agreement inside FreeSurfer's labelled voxels
        tissue = seg.labels > 0
        outside = 100 * float((tissue & (given.array == 0)).sum()) / max(int(tissue.sum()), 1)
        grid, step, sec, ml, warn = describe(scan, seg, seconds, step, warnings)
        rows.append([name, "mrtrix-sub01", label, grid, step, sec, *fmt(dice_per_class(inside, fs, CLASSES)),
                     ml, f"{outside:.1f} %", warn])
    return rows


# --- output ------------------------------------------------------------------------------

CAPTION = ("IBSR rows: Dice against the manual labels, on the grid psc segmented (a variant's labels: the manual "
           "labels resampled onto its grid with nearest neighbour). mrtrix-sub01 rows: agreement with FreeSurfer "
           "aparc+aseg inside its labelled voxels (its CSF: ventricles only), not accuracy; \"outside mask\": share "
           "of psc's labelled volume outside sub-01_brainmask. seconds: brain step + segment_scan, one run.")


def markdown(rows: list[list[str]], header: str) -> str:
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", nargs="+", type=Path, default=[ShippedWeights.MRI_TISSUE.value.path])
    parser.add_argument("--scans", nargs="+", default=["IBSR_07", "IBSR_16"], help="IBSR case names")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default=MRISegmentOptions.precision, choices=PRECISIONS)
    parser.add_argument("--overlap", type=float, default=MRISegmentOptions.overlap)
    parser.add_argument("--markdown", type=Path, help="append the table as markdown to this file")
    parser.add_argument("--out", type=Path, help="keep the variant scans and psc-segment's outputs here")
    args = parser.parse_args(argv)
    if not IBSR.is_dir() or not MRTRIX.is_dir():
        print(f"mri_robustness: skipped, the data is absent ({IBSR.parent} needs ibsr18/ and mrtrix-sub01/)")
        return 0
    torch.set_num_threads(args.threads)
    console = Console(width=230)
    machine = machine_line(args.device)
    console.print(machine)
    rows: list[list[str]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as work:
        for path in args.weights:
            network = load_network(path, MRI_TISSUE, args.device, args.precision)  # sha256 and kind checked
            name = f"{path.stem} ({network.precision})"
            keep = args.out / path.stem if args.out else None
            if keep:
                keep.mkdir(parents=True, exist_ok=True)
            rows += ibsr_rows(name, network, args, Path(work), keep, notes)
            rows += mrtrix_rows(name, network, args, keep, notes)
    table = Table(title="MRI robustness: other resolutions, intensities and a raw skull-on scan", caption=CAPTION)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("weights", "scan", "input", "brain") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for note in notes:
        console.print(f"  {note}", highlight=False, soft_wrap=True)
    if args.markdown:
        with open(args.markdown, "a") as out:
            out.write(markdown(rows, f"{machine}\n\n{CAPTION}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
