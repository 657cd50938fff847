"""``psc-eval PRED GT``: Dice, HD95 and volume difference per tissue class.

PRED and GT are files or folders. Folders are matched by subject: a prediction
``<stem>_dseg.nii.gz`` pairs with a truth file named
(first of ``<stem>_seg``, ``<stem>_dseg``, ``<stem>_labels``, ``<stem>``). Both must share a grid.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from psc.pipelines.errors import InputError

PROG = "psc-eval"
DEFAULT_NAMES = {1: "CSF", 2: "GM", 3: "WM"}


def pair_files(pred: Path, truth: Path) -> list[tuple[str, Path, Path]]:
    from psc.pipelines.mri.io import is_scan_file, scan_stem

    if pred.is_file() and truth.is_file():
        return [(scan_stem(pred).removesuffix("_dseg"), pred, truth)]
    if not (pred.is_dir() and truth.is_dir()):
        raise InputError("give two files or two folders")
    truths = sorted(p for p in truth.rglob("*") if is_scan_file(p))
    pairs = []
    for p in sorted(q for q in pred.rglob("*_dseg.*") if is_scan_file(q)):
        stem = scan_stem(p).removesuffix("_dseg")
        by_stem = {scan_stem(t): t for t in truths}
        # A label file beats the scan itself, which shares the bare stem.
        for candidate in (f"{stem}_seg", f"{stem}_dseg", f"{stem}_labels", stem):
            if candidate in by_stem:
                pairs.append((stem, p, by_stem[candidate]))
                break
    if not pairs:
        raise InputError(f"no <stem>_dseg file in {pred} has a matching ground truth in {truth}")
    return pairs


def score(pred_path: Path, truth_path: Path, names: dict[int, str]) -> dict:
    from psc.pipelines.mri.io import read_scan
    from psc.pipelines.mri.metrics import dice_per_class, hd95_per_class, volume_difference

    pred, truth = read_scan(pred_path), read_scan(truth_path)
    if pred.array.shape != truth.array.shape:
        raise InputError(f"{pred_path.name} has shape {pred.array.shape}, {truth_path.name} {truth.array.shape}")
    if not np.allclose(pred.affine, truth.affine, atol=1e-3):
        raise InputError(f"{pred_path.name} and {truth_path.name} lie on different grids (affines differ)")
    p, t = pred.array.astype(np.int64), truth.array.astype(np.int64)
    spacing = np.sqrt((pred.affine[:3, :3] ** 2).sum(0))
    dice = dice_per_class(p, t, names)
    present = [v for v in dice.values() if not math.isnan(v)]
    return {"dice": {names[c]: v for c, v in dice.items()},
            "dice_mean": float(np.mean(present)) if present else float("nan"),
            "hd95_mm": {names[c]: v for c, v in hd95_per_class(p, t, names, spacing).items()},
            "volume_difference_percent": {names[c]: v for c, v in volume_difference(p, t, names).items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pred", type=Path)
    parser.add_argument("truth", type=Path)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--labels", nargs="+", default=None, metavar="INDEX=NAME",
                        help="classes to score (default: 1=CSF 2=GM 3=WM)")
    args = parser.parse_args(argv)
    try:
        names = DEFAULT_NAMES
        if args.labels:
            names = {int(k): v for k, v in (item.split("=", 1) for item in args.labels)}
        results = {case: score(p, t, names) for case, p, t in pair_files(args.pred, args.truth)}
    except InputError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"{PROG}: error: --labels takes INDEX=NAME items ({error})", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    table = Table(title="psc-eval")
    table.add_column("case")
    for name in names.values():
        table.add_column(f"Dice {name}", justify="right")
    table.add_column("Dice mean", justify="right")
    for name in names.values():
        table.add_column(f"HD95 {name} (mm)", justify="right")
    for name in names.values():
        table.add_column(f"dVol {name} (%)", justify="right")
    for case, r in results.items():
        table.add_row(case, *(f"{r['dice'][n]:.4f}" for n in names.values()), f"{r['dice_mean']:.4f}",
                      *(f"{r['hd95_mm'][n]:.2f}" for n in names.values()),
                      *(f"{r['volume_difference_percent'][n]:+.1f}" for n in names.values()))
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
