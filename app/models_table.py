"""``psc-models``: every backbone x convolution type with its measured size and cost.

The default rows are the paper's variants (conv3d, P1SC1, P2SC2, P2SC3) and the other
members of the family at their default configurations (``cakes``: the three 2D kernels
evenly; ``jfd``: 2 axial x 6 planar atoms); any registry name can be given to
``--convs`` (``cakes-1d``, ``jfd3x9``, ...)."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from psc.app.cli import HelpFormatter, run_guarded
from psc.models import STANDARD_CONVS, build_model, list_models, make_conv, measure, model_defaults
from psc.models.conv_registry import FAMILY_CONVS
from psc.utils.errors import InputError

PROG = "psc-models"

# Small, fast-to-measure configurations; the ratios between conv types are what the
# table is for. Options are printed under the table so the numbers can be reproduced.
TABLE_OPTIONS = {
    "densenet3d": {},
    "unet3d": {"padding": "same"},
    "resnet3d": {"depth": 18},
}
# Narrow twins for the receptive-field probe: same layout, fewer channels.
NARROW = {
    "densenet3d": {"init_channels": 3, "growth_rate": 3, "side_channels": 3},
    "unet3d": {"num_fmaps": 3, "fmap_inc_factor": 1},
    "resnet3d": {"width": 3},
}
PROBE_SHAPE = {"densenet3d": (32, 32, 32), "unet3d": (32, 32, 32), "resnet3d": (16, 64, 64)}


def build_rows(models: list[str], convs: list[str], receptive: bool) -> list[dict]:
    rows = []
    for name in models:
        base = None
        for conv in convs:
            options = TABLE_OPTIONS.get(name, {})
            model = build_model(name, conv=conv, **options)
            in_channels = model_defaults(name)["in_channels"]
            twin = build_model(name, conv=conv, **options, **NARROW.get(name, {}))
            stats = measure(model, in_channels, PROBE_SHAPE.get(name, (32, 32, 32)),
                            with_receptive_field=receptive and name != "resnet3d", rf_model=twin)
            if base is None:
                base = stats
            rows.append({
                "model": name, "conv": conv, "parameters": stats.parameters,
                "macs_per_voxel": stats.macs_per_voxel, "receptive_field": stats.receptive_field,
                "param_ratio": stats.parameters / base.parameters,
                "mac_ratio": stats.macs_per_voxel / base.macs_per_voxel,
            })
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--models", nargs="+", default=list_models(), help="backbones")
    parser.add_argument("--convs", nargs="+", default=list(STANDARD_CONVS + FAMILY_CONVS),
                        help="conv types (registry names), first is the ratio base")
    parser.add_argument("--no-receptive-field", action="store_true", help="skip the (slower) receptive field probe")
    return parser


def check_names(models: list[str], convs: list[str]) -> None:
    """Unknown backbones or conv types are the user's mistake: one line, before any work."""
    unknown = [name for name in models if name not in list_models()]
    if unknown:
        raise InputError(f"unknown model {unknown[0]!r}; available: {', '.join(list_models())}")
    for conv in convs:
        try:
            make_conv(conv)
        except ValueError as error:  # the conv registry's own message: what the names look like
            raise InputError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_guarded(PROG, lambda: run(args))


def run(args: argparse.Namespace) -> int:
    models = args.models
    check_names(models, args.convs)
    rows = build_rows(models, args.convs, not args.no_receptive_field)
    table = Table(title="psc backbones x convolution types")
    for column in ("model", "conv", "parameters", "MACs / output voxel", "receptive field (z,y,x)",
                   f"params / {args.convs[0]}", f"MACs / {args.convs[0]}"):
        table.add_column(column, justify="left" if column in ("model", "conv") else "right")
    for row in rows:
        rf = row["receptive_field"]
        table.add_row(row["model"], row["conv"], f"{row['parameters']:,}", f"{row['macs_per_voxel']:,.0f}",
                      "x".join(map(str, rf)) if rf else "-", f"{row['param_ratio']:.2f}", f"{row['mac_ratio']:.2f}")
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(table)
    console.print("options: " + "; ".join(f"{m} {model_defaults(m) | TABLE_OPTIONS.get(m, {})}" for m in models))
    console.print("resnet3d MACs are per input voxel (it classifies); its receptive field is the whole clip.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
