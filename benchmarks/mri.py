"""Whole-scan MRI segmentation time and validation Dice, per model, side by side.

    python benchmarks/mri.py [--scans PATH...] [--weights W.pt...] [--repeats 2] [--threads N]
                             [--precision auto fp32 ...] [--window auto 96 ...]

Times ``psc-segment``'s own path (read, model space, sliding window, back to the input
grid) on each scan, median of ``--repeats`` after one untimed warm-up run, for every
combination of weights, precision and window, and scores the labels against the
``<stem>_seg`` file beside each scan when there is one (Dice on the input grid).
``--cli`` also times the whole command as a user runs it, once per row
(``psc-segment SCAN -o TMP --force`` in a fresh process: imports, weights, every output
file written), in the "command s" column.
Defaults: the two IBSR validation scans when ../shared/data is present, else the
bundled MNI152 sample; the shipped weights plus the comparison models in benchmarks/weights/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from psc.app.segment import window_size  # noqa: E402
from psc.models.shipped import ShippedWeights  # noqa: E402
from psc.models.weights import MRI_TISSUE, load_weights  # noqa: E402
from psc.pipelines.mri.inference import segment_scan  # noqa: E402
from psc.pipelines.mri.io import read_scan  # noqa: E402
from psc.pipelines.mri.metrics import dice_per_class  # noqa: E402
from psc.pipelines.mri.options import MRISegmentOptions  # noqa: E402
from psc.pipelines.mri.sample import sample_t1_path  # noqa: E402
from psc.pipelines.precision import PRECISIONS  # noqa: E402

from machine import machine_line  # noqa: E402  (benchmarks/, first on sys.path)

IBSR = ROOT.parent / "shared" / "data" / "ibsr18"


def default_scans() -> list[Path]:
    scans = [IBSR / case / f"{case}.nii.gz" for case in ("IBSR_07", "IBSR_16")]
    return scans if all(p.is_file() for p in scans) else [sample_t1_path()]


def truth_for(scan: Path) -> Path | None:
    name = scan.name.replace(".nii.gz", "_seg.nii.gz")
    return scan.with_name(name) if scan.with_name(name).is_file() else None


def measure(model, card, weights: Path, scan_path: Path, precision: str, window, args) -> list[str]:
    """One row: how the network ran, the median time, and Dice when there is a truth."""
    scan = read_scan(scan_path)
    run = lambda: segment_scan(scan, model, card, device=args.device, overlap=args.overlap,  # noqa: E731
                               precision=precision, window=window)
    seg = run()  # warm-up: oneDNN builds its kernels on the first call of each shape
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        seg = run()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    command = command_seconds(scan_path, weights, precision, window, args) if args.cli else "-"
    dice = ["-"] * 4
    if truth_for(scan_path):
        truth = read_scan(truth_for(scan_path)).array
        scores = dice_per_class(seg.labels, truth, (1, 2, 3))
        dice = [f"{scores[c]:.4f}" for c in (1, 2, 3)] + [f"{np.nanmean(list(scores.values())):.4f}"]
    return [seg.precision, str(seg.windows), scan_path.name, f"{scan.array.size:,}", f"{seconds:.1f}",
            f"{scan.array.size / seconds / 1e6:.2f}", command, *dice]


def command_seconds(scan_path: Path, weights: Path, precision: str, window, args) -> str:
    """Wall time of the psc-segment command a user would type, in a fresh process."""
    with tempfile.TemporaryDirectory() as out:
        command = [str(Path(sys.executable).with_name("psc-segment")), str(scan_path), "-o", out, "--force",
                   "--weights", str(weights), "--device", args.device, "--precision", precision,
                   "--overlap", str(args.overlap)]
        if window is not None:
            command += ["--window", ",".join(map(str, window))]
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env)
        return f"{time.perf_counter() - start:.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scans", nargs="+", type=Path, default=None)
    parser.add_argument("--weights", nargs="+", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--overlap", type=float, default=MRISegmentOptions.overlap)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["auto"], choices=PRECISIONS)
    parser.add_argument("--window", nargs="+", type=window_size, default=[None], help="auto, N or Z,Y,X")
    parser.add_argument("--cli", action="store_true", help="also time the psc-segment command end to end")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scans = args.scans or default_scans()
    weights = args.weights or [ShippedWeights.MRI_TISSUE.value.path, *sorted((ROOT / "benchmarks" / "weights").glob("mri_*.pt"))]
    console = Console(width=230)
    console.print(f"{machine_line(args.device)}; overlap {args.overlap}")
    table = Table(title="whole-scan MRI segmentation (read -> labels on the input grid)")
    for column in ("weights", "conv", "params", "precision", "windows", "scan", "voxels", "seconds", "Mvoxel/s",
                   "command s", "Dice CSF", "Dice GM", "Dice WM", "Dice mean"):
        table.add_column(column, justify="left" if column in ("weights", "conv", "scan", "precision") else "right")
    for path in weights:
        model, card = load_weights(path, kind=MRI_TISSUE)  # sha256 and kind checked
        for precision in args.precision:
            for window in args.window:
                for scan_path in scans:
                    table.add_row(path.name, card.conv, f"{card.parameters:,}",
                                  *measure(model, card, path, scan_path, precision, window, args))
            table.add_section()
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
