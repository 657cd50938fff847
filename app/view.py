"""``psc-view PATH...``: napari with the inputs and their psc outputs already overlaid.

What opens for each kind of path is the viewer's business (``psc.plugins.napari.viewer``,
whose description ``--help`` shows); this command parses its arguments and calls it.
"""

from __future__ import annotations

import argparse
import sys

from psc.app.cli import HelpFormatter, run_guarded

PROG = "psc-view"


def build_parser() -> argparse.ArgumentParser:
    from psc.pipelines.mri.options import SAMPLE_OUTPUT
    from psc.plugins.napari.viewer import WIDGETS

    from psc.plugins.napari import viewer

    what_opens = viewer.__doc__.split("\n\n", 1)[1].replace(":func:", "").replace("``", "").replace("`", "")
    description = f"{PROG} PATH...: napari with the inputs and their psc outputs already overlaid.\n\n{what_opens}"
    parser = argparse.ArgumentParser(prog=PROG, description=description, formatter_class=HelpFormatter)
    parser.add_argument("paths", nargs="*", help="scans, psc outputs, EM containers or runs (x.zarr, OUT.zarr)")
    parser.add_argument("--sample", action="store_true", help="open the MNI152 T1 sample (and its outputs from "
                        f"psc-segment --sample, if present in ./{SAMPLE_OUTPUT})")
    parser.add_argument("--widget", action="append", choices=sorted(WIDGETS), dest="widgets",
                        help="dock this psc widget (repeatable); without it: threshold for an EM run")
    parser.add_argument("--dry-run", action="store_true", help="print the layers that would open, and exit")
    return parser


def sample_paths() -> list[str]:
    """The MNI152 sample, and its dseg where ``psc-segment --sample`` writes it."""
    from psc.pipelines.mri.options import SAMPLE_OUTPUT
    from psc.pipelines.mri.outputs import output_paths
    from psc.pipelines.mri.sample import sample_t1_path

    dseg = output_paths(sample_t1_path(), SAMPLE_OUTPUT, probabilities=False)["dseg"]
    return [str(sample_t1_path())] + ([str(dseg)] if dseg.is_file() else [])


def run(args: argparse.Namespace) -> int:
    from psc.plugins.napari.viewer import collect, describe, open_viewer

    if args.dry_run:
        for layer in collect(args.paths):
            print(describe(layer))
        return 0
    import napari

    open_viewer(args.paths, widgets=args.widgets, title=PROG)
    napari.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.paths = list(args.paths) + (sample_paths() if args.sample else [])
    if not args.paths:
        parser.error("give at least one path, or --sample")
    return run_guarded(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
