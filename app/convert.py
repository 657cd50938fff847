"""``psc-convert``: copy an EM volume into a zarr v3 container for the EM pipeline.

SRC is PATH[:DATASET]:
  file.h5:/stack          an HDF5 data set (.h5, .hdf5, .hdf; lzf/gzip compressed too);
                          :DATASET may be left out when the file holds only one
  stack.tif               a multi-page TIFF (.tif, .tiff)
  slices/  "slices/*.tif" a folder or glob of 2-D TIFF slices, stacked along z in
                          natural name order (z2 before z10)
  volume.npy  a.npz:NAME  numpy arrays (:NAME may be left out for a one-array .npz)

The data must be 3-D (z, y, x); singleton leading or trailing axes are dropped.
uint8, uint16 and float data are images: stored as they are (float64 as float32) in an
array named raw. Other integer types are labels: stored as uint64 in an array named
labels. NaN/infinite images and negative labels are refused.

The array is written as DST.zarr/.NAME.partial and renamed to DST.zarr/NAME once complete,
with its voxel size and offset in the array's attributes and in the container's OME-Zarr
metadata. Example:
  psc-convert train-image.h5:/stack fib25.zarr --voxel-size 8 8 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from psc.app.cli import HelpFormatter, add_option, run_guarded

PROG = "psc-convert"


def build_parser() -> argparse.ArgumentParser:
    import inspect

    from psc.pipelines.em.convert import convert

    defaults = {name: p.default for name, p in inspect.signature(convert).parameters.items()}  # written once, there

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.replace("``", ""),
                                     formatter_class=HelpFormatter)
    parser.add_argument("source", metavar="SRC[:DATASET]", help="HDF5, TIFF, TIFF slices, .npy or .npz (see above)")
    parser.add_argument("destination", metavar="DST.zarr", type=Path, help="zarr container (created if missing)")
    parser.add_argument("--voxel-size", nargs=3, type=float, required=True, metavar=("Z", "Y", "X"),
                        help="voxel size in nm (required)")
    parser.add_argument("--offset", nargs=3, type=float, default=list(defaults["offset"]), metavar=("Z", "Y", "X"),
                        help="world position of the first voxel in nm")
    add_option(parser, "--name", help="array name in DST.zarr", default="raw for images, labels for labels")
    parser.add_argument("--chunks", nargs=3, type=int, default=list(defaults["chunks"]), metavar=("Z", "Y", "X"),
                        help="chunk shape in voxels, clipped to the volume")
    parser.add_argument("--force", action="store_true", help="replace an existing array of that name")
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from psc.pipelines.em.convert import convert

    volume = convert(args.source, args.destination, args.voxel_size, offset=args.offset, name=args.name,
                     chunks=args.chunks, force=args.force)
    array = volume.array
    print(f"{args.destination}/{Path(str(array.path)).name}: {'x'.join(map(str, array.shape))} {array.dtype}, "
          f"chunks {'x'.join(map(str, array.chunks))}, voxel size {' '.join(f'{v:g}' for v in volume.voxel_size)} nm, "
          f"offset {' '.join(f'{v:g}' for v in volume.offset)} nm")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    return run_guarded(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
