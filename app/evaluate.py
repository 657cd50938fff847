"""``psc-eval PRED GT``: Dice, HD95 and volume difference per tissue class.

PRED and GT are files or folders. Folders are matched by subject: a prediction
``<stem>_dseg.nii.gz`` pairs with a truth file named
(first of ``<stem>_seg``, ``<stem>_dseg``, ``<stem>_labels``, ``<stem>``), searched in
GT and its subfolders; a prediction without one is skipped with a warning. Both maps
must share a grid (shape and affine) and be label maps: a prediction with labels outside
the label table (0 and the tissue classes, plus any --labels) or anything that looks like
an image (fractional voxels, far more distinct values than classes) is refused. A class absent from both has Dice NaN (printed
``nan``, ``null`` in ``--json``) and is left out of the mean.

EM: PRED is an EM run (``OUT.zarr``: every stored threshold is scored) or a segmentation
array (``x.zarr/NAME``; ``OUT.zarr/segmentation`` is a run's, in either of its layouts),
GT a labels array; prints VI split/merge and adapted Rand (ground-truth label 0
ignored), computed block by block.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
from nibabel.affines import voxel_sizes
from rich.console import Console
from rich.table import Table

from psc.app.cli import HelpFormatter, run_guarded
from psc.pipelines.mri.config import LABELS
from psc.utils.errors import InputError


PROG = "psc-eval"
DEFAULT_NAMES = {index: name for index, name in LABELS.items() if index != 0}  # the tissue classes


def pair_files(pred: Path, truth: Path) -> list[tuple[str, Path, Path]]:
    from psc.pipelines.mri.io import is_scan_file, scan_stem
    from psc.pipelines.mri.outputs import role, subject_stem

    if pred.is_file() and truth.is_file():
        return [(subject_stem(pred), pred, truth)]
    if not (pred.is_dir() and truth.is_dir()):
        raise InputError("give two files or two folders")
    by_stem = {scan_stem(t): t for t in sorted(truth.rglob("*")) if is_scan_file(t)}
    pairs = []
    for p in sorted(q for q in pred.rglob("*") if is_scan_file(q) and role(q) == "dseg"):
        stem = subject_stem(p)
        # A label file beats the scan itself, which shares the bare stem.
        match = next((by_stem[c] for c in (f"{stem}_seg", f"{stem}_dseg", f"{stem}_labels", stem) if c in by_stem),
                     None)
        if match is None:
            print(f"{PROG}: warning: no ground truth for {p.name} in {truth}; skipped", file=sys.stderr)
        else:
            pairs.append((stem, p, match))
    if not pairs:
        raise InputError(f"no <stem>_dseg file in {pred} has a matching ground truth in {truth}")
    return pairs


def score(pred_path: Path, truth_path: Path, names: dict[int, str]) -> dict:
    from psc.pipelines.mri.io import read_scan
    from psc.pipelines.mri.metrics import check_label_map, dice_per_class, hd95_per_class, volume_difference

    pred, truth = read_scan(pred_path, allow_empty=True), read_scan(truth_path, allow_empty=True)
    if pred.array.shape != truth.array.shape:
        raise InputError(f"{pred_path.name} has shape {pred.array.shape}, {truth_path.name} {truth.array.shape}")
    if not np.allclose(pred.affine, truth.affine, atol=1e-3):
        raise InputError(f"{pred_path.name} and {truth_path.name} lie on different grids (affines differ)")
    table = {*LABELS, *names}  # psc's classes and any --labels adds
    for scan, prediction in ((pred, True), (truth, False)):
        # A probability map, a T1 or labels psc never writes fail loudly, not with Dice 0.
        try:
            check_label_map(scan.array, table, prediction=prediction)
        except InputError as error:
            raise InputError(f"{scan.path.name} {error}") from None
    p, t = pred.array.astype(np.int64), truth.array.astype(np.int64)
    spacing = voxel_sizes(pred.affine)
    dice = dice_per_class(p, t, names)
    present = [v for v in dice.values() if not math.isnan(v)]
    return {"dice": {names[c]: v for c, v in dice.items()},
            "dice_mean": float(np.mean(present)) if present else float("nan"),
            "hd95_mm": {names[c]: v for c, v in hd95_per_class(p, t, names, spacing).items()},
            "volume_difference_percent": {names[c]: v for c, v in volume_difference(p, t, names).items()}}


def _cell(value: float, spec: str) -> str:
    """A table cell; NaN (class absent, nothing to measure) as a dash."""
    return "-" if math.isnan(value) else format(value, spec)


def _nan_to_none(value):
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return None if isinstance(value, float) and math.isnan(value) else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.replace("``", ""),
                                     formatter_class=HelpFormatter)
    parser.add_argument("pred", type=Path)
    parser.add_argument("truth", type=Path)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--labels", nargs="+", default=None, metavar="INDEX=NAME",
                        help="classes to score; without it: " + " ".join(f"{i}={n}" for i, n in DEFAULT_NAMES.items()))
    return parser


def label_names(items: list[str] | None) -> dict[int, str]:
    """``--labels INDEX=NAME ...`` as a dict (the tissue classes without it)."""
    if not items:
        return dict(DEFAULT_NAMES)
    names = {}
    for item in items:
        index, _, name = item.partition("=")
        if not name or not index.strip().lstrip("-").isdigit():
            raise InputError(f"--labels takes INDEX=NAME items, not {item!r}")
        names[int(index)] = name
    return names


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(PROG, lambda: run(args))


def run(args: argparse.Namespace) -> int:
    from psc.pipelines.em.volumes import names_zarr

    if names_zarr(args.pred):
        return _evaluate_em(args)
    names = label_names(args.labels)
    results = {case: score(p, t, names) for case, p, t in pair_files(args.pred, args.truth)}
    if args.json:  # NaN (no evidence) as null: strict JSON that jq and browsers accept
        print(json.dumps(_nan_to_none(results), indent=2, allow_nan=False))
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
        table.add_row(case, *(_cell(r["dice"][n], ".4f") for n in names.values()), _cell(r["dice_mean"], ".4f"),
                      *(_cell(r["hd95_mm"][n], ".2f") for n in names.values()),
                      *(_cell(r["volume_difference_percent"][n], "+.1f") for n in names.values()))
    Console(width=None if sys.stdout.isatty() else 160).print(table)
    return 0


def _evaluate_em(args: argparse.Namespace) -> int:
    from psc.pipelines.em.evaluate import evaluate_run, evaluate_volume, format_table
    from psc.pipelines.em.layout import GRAPH_FILE

    if (args.pred / GRAPH_FILE).is_file():
        results = evaluate_run(str(args.pred), str(args.truth), progress=sys.stderr.isatty())
    else:
        results = {"segmentation": evaluate_volume(str(args.pred), str(args.truth), progress=sys.stderr.isatty())}
    if args.json:
        print(json.dumps({str(k): v for k, v in results.items()}, indent=2))
    elif "segmentation" in results:
        print("  ".join(f"{k} {v:.4f}" for k, v in results["segmentation"].items()))
    else:
        print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
