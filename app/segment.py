"""``psc-segment``: tissue segmentation of T1 scans (files, folders, globs), or neuron
segmentation of an EM volume (``RAW.zarr -o OUT.zarr``).

MRI: writes ``<stem>_dseg.nii.gz``, ``_dseg.tsv``, ``_volumes.tsv``, ``_qc.png`` (and
``_probseg.nii.gz`` with ``--probabilities``) beside each input or under ``-o DIR``.
EM: writes the arrays ``affinities``, ``fragments`` and ``segmentation`` and the region
graph ``graph.sqlite`` into OUT.zarr; running the same command again resumes.
"""

from __future__ import annotations

import argparse
import glob
import pickle
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import psc.models
from psc.app.cli import HelpFormatter, run_guarded
from psc.app.segment_em import add_arguments as add_em_arguments
from psc.app.segment_em import run_em
from psc.pipelines.allocator import keep_freed_memory
from psc.utils.errors import InputError
from psc.pipelines.precision import PRECISIONS


PROG = "psc-segment"
DEFAULT_WEIGHTS = Path(psc.models.__file__).parent / "pretrained" / "mri_densenet3d_p2sc2.pt"


def expand_inputs(items: list[str]) -> list[Path]:
    """Files, DICOM folders, folders of scans and globs -> scan paths, in order."""
    from psc.pipelines.mri.io import is_scan_file

    found: list[Path] = []
    for item in items:
        matches = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise InputError(f"{item}: no file matches")
        for match in map(Path, matches):
            if match.is_dir() and not is_zarr(match):
                scans = sorted(p for p in match.iterdir() if is_scan_file(p) and not _is_output(p))
                found += scans or [match]  # no scan files: treat as one DICOM series
            else:
                found.append(match)
    return found


def is_zarr(path: Path) -> bool:
    """A zarr container or an array inside one (``raw.zarr``, ``raw.zarr/raw``)."""
    return any(part.endswith(".zarr") for part in path.parts) or (path / "zarr.json").is_file()


def _is_output(path: Path) -> bool:
    return any(path.name.endswith(s) for s in ("_dseg.nii.gz", "_probseg.nii.gz"))


def window_size(text: str) -> tuple[int, int, int] | None:
    """``auto`` (None), ``N`` (a cube) or ``Z,Y,X``."""
    if text == "auto":
        return None
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto, N or Z,Y,X") from None
    if len(sizes) not in (1, 3) or min(sizes) < 8:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto, one size or three, each at least 8")
    return tuple(sizes * 3 if len(sizes) == 1 else sizes)  # type: ignore[return-value]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.replace("``", ""),
                                     formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="*", help="scans (NIfTI, MGZ, NRRD, MHA/MHD), DICOM folders, folders, globs")
    parser.add_argument("-o", "--output", type=Path, help="output folder (default: beside each input)")
    parser.add_argument("--sample", action="store_true", help="segment the bundled MNI152 T1 template")
    parser.add_argument("--pipeline", choices=("auto", "mri", "em"), default="auto",
                        help="auto: .zarr inputs are EM, everything else MRI")
    parser.add_argument("--weights", type=Path, help="weights .pt with its .json card (default: the shipped "
                        "MRI or EM model)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="network precision; auto: fp16 on CUDA, bf16 on CPUs with native bf16 "
                        "(AVX512-BF16/AMX), else fp32")
    parser.add_argument("--window", type=window_size, default=None, metavar="auto|N|Z,Y,X",
                        help="sliding window in model voxels; auto: the whole brain crop in one window "
                        "when it fits, else 96^3 tiles (default: auto)")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--tta", action="store_true", help="average with the left-right mirrored prediction")
    parser.add_argument("--mask", type=Path, help="brain mask (same grid) instead of the nonzero voxels")
    parser.add_argument("--probabilities", action="store_true", help="also write <stem>_probseg.nii.gz")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    add_em_arguments(parser)
    args = parser.parse_args(argv)
    if not args.inputs and not args.sample:
        parser.error("give at least one input, or --sample")
    return args


def run(args: argparse.Namespace, console: Console) -> int:
    from psc.models.weights import WeightsError, load_weights
    from psc.pipelines.mri.inference import resolve_device, segment_scan
    from psc.pipelines.mri.io import read_scan
    from psc.pipelines.mri.outputs import check_outputs, output_paths, write_outputs
    from psc.pipelines.mri.sample import sample_t1_path

    inputs = expand_inputs(args.inputs)
    if args.sample:
        inputs.append(sample_t1_path())
        args.output = args.output or Path("psc-sample-output")
    if args.pipeline == "em" or (args.pipeline == "auto" and any(is_zarr(p) for p in inputs)):
        return run_em(args, inputs, console)
    args.weights = args.weights or DEFAULT_WEIGHTS
    if not 0 <= args.overlap < 1:
        raise InputError(f"--overlap must be in [0, 1), got {args.overlap}")
    resolve_device(args.device)
    if not args.weights.is_file() and args.weights == DEFAULT_WEIGHTS:
        raise InputError(f"the default weights are missing from this installation ({DEFAULT_WEIGHTS}); "
                         "reinstall psc or give --weights PATH")
    try:
        model, card = load_weights(args.weights)
    except WeightsError as error:
        raise InputError(str(error)) from None
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError) as error:
        # A card that is not JSON, or weights of another architecture than the card's.
        raise InputError(f"{args.weights}: cannot load these weights ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:160] if str(error) else ''})") from None
    mask = read_scan(args.mask) if args.mask else None

    failures = 0
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("segmenting", total=len(inputs))
        windows = progress.add_task("  windows", total=None)
        on_window = lambda done, total: progress.update(windows, completed=done, total=total)  # noqa: E731
        for path in inputs:
            progress.update(task, description=f"segmenting {path.name}")
            progress.reset(windows, total=None)
            started = time.perf_counter()
            try:
                paths = output_paths(path, args.output, args.probabilities)
                check_outputs(paths, args.force)
                scan = read_scan(path)
                seg = segment_scan(scan, model, card, device=args.device, overlap=args.overlap, tta=args.tta,
                                   mask=mask, precision=args.precision, window=args.window,
                                   on_window=on_window)
                write_outputs(seg, scan, paths, card.labels)
            except InputError as error:
                failures += 1
                print(f"{PROG}: error: {error}", file=sys.stderr)
                progress.advance(task)
                continue
            report(console, path, paths, seg, card.labels, scan.voxel_volume, time.perf_counter() - started)
            progress.advance(task)
    return 1 if failures else 0


def report(console: Console, path: Path, paths: dict[str, Path], seg, names: dict[int, str],
           voxel_volume: float, seconds: float) -> None:
    """Per scan: where its outputs went, the tissue volumes, how long it took and how
    the network ran (precision, windows), since both change the time."""
    counts = np.bincount(seg.labels.ravel(), minlength=max(names) + 1)
    volumes = ", ".join(f"{name} {counts[i] * voxel_volume / 1000:.1f} ml" for i, name in names.items() if i)
    windows = f"{seg.windows} window{'s' if seg.windows != 1 else ''}"
    console.print(f"{path.name}: {seconds:.1f} s ({seg.precision}, {windows}); {volumes}", highlight=False,
                  soft_wrap=True)
    for output in paths.values():
        console.print(f"  {output}", highlight=False, soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    keep_freed_memory()
    return run_guarded(PROG, lambda: run(args, Console(highlight=False)))


if __name__ == "__main__":
    sys.exit(main())
