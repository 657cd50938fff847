"""How long napari takes to show a large EM run with and without its resolution levels.

A synthetic run output (no network: random uint8 affinities and blocky uint64 fragments
and segmentation, written with ``volumes.create_run_volume`` in the OME-Zarr layout of
OUT.zarr) gets levels 1..L from the downsample stage's own functions, block by block as
the stage writes them. It is opened with psc's napari reader (``read_zarr``) in a napari
viewer twice: as the reader gives it (multiscale layers) and with only level 0 of each
image (what the reader gave before the downsample stage). For each it times, each to a
rendered frame (``viewer.screenshot``; a multiscale layer picks its level at draw time,
so a frame is redrawn until the level and the tiles in view settle):

- open: adding the layers and the first frame;
- z step: ``dims.current_step`` one slice further, at the initial view;
- zoom out: the camera zoomed out so the whole volume covers a quarter of the canvas;
- z step zoomed out: one slice further in that view.

Run it under a display (``xvfb-run -a``). Uses the CPU: ~1-2 minutes at 512^3.

    xvfb-run -a python benchmarks/napari_pyramid.py --size 512 --out /tmp/pyramid.zarr
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_run(out: Path, size: int, block: int, seed: int = 0) -> int:
    """A run-shaped OUT.zarr of ``size``^3 with levels; returns L."""
    import zarr
    from funlib.geometry import Roi

    from psc.pipelines.em import layout
    from psc.pipelines.em.downsample import downsample, level_count, level_shape
    from psc.pipelines.em.volumes import create_run_volume

    if out.exists():
        shutil.rmtree(out)
    group = zarr.open_group(str(out), mode="w")
    shape = (size,) * 3
    voxel, offset = (8.0, 8.0, 8.0), (0.0, 0.0, 0.0)
    count = level_count((block,) * 3, shape)
    images = {layout.AFFINITIES: ("uint8", 3), layout.FRAGMENTS: ("uint64", 0), layout.SEGMENTATION: ("uint64", 0)}
    pyramids = {}
    for name, (dtype, channels) in images.items():
        volumes = []
        size_, origin = list(voxel), list(offset)
        for level in range(count + 1):
            if level:
                origin = [o + v / 2 for o, v in zip(origin, size_)]
                size_ = [v * 2 for v in size_]
            volumes.append(create_run_volume(group, name, level_shape(shape, level), dtype,
                                             chunks=[block // 2 ** level] * 3, voxel_size=size_, offset=origin,
                                             channels=channels, level=level))
        pyramids[name] = volumes
    rng = np.random.default_rng(seed)
    grid = np.indices(shape, sparse=True)
    for start in np.ndindex(*(size // block,) * 3):
        roi = Roi(tuple(s * block for s in start), (block,) * 3)
        (z0, y0, x0), (z1, y1, x1) = roi.begin, roi.end
        z, y, x = grid[0][z0:z1], grid[1][:, y0:y1], grid[2][:, :, x0:x1]
        # blocky labels: cells of 24^3 (fragments: 12^3), ids from their cell index
        segmentation = ((z // 24) * 10_000 + (y // 24) * 100 + x // 24 + 1).astype(np.uint64)
        fragments = ((z // 12) * 1_000_000 + (y // 12) * 1_000 + x // 12 + 1).astype(np.uint64)
        affinities = rng.integers(0, 256, size=(3, block, block, block), dtype=np.uint8)
        for name, data in ((layout.AFFINITIES, affinities), (layout.FRAGMENTS, fragments),
                           (layout.SEGMENTATION, segmentation)):
            volumes = pyramids[name]
            volumes[0].write(roi, data)
            for level, volume in enumerate(volumes[1:], start=1):
                data = downsample(data, name in layout.LABEL_IMAGES)
                volume.write(Roi(tuple(o // 2 ** level for o in roi.begin), data.shape[-3:]), data)
    return count


def _settle(viewer, app, path: str | None = None) -> float:
    """Render until the multiscale layers' levels and tiles stop changing; seconds."""
    started = time.perf_counter()
    seen = None
    for _ in range(6):
        app.processEvents()
        viewer.screenshot(path=path, canvas_only=True, flash=False)
        state = tuple((getattr(layer, "data_level", 0), tuple(np.ravel(layer.corner_pixels)))
                      for layer in viewer.layers)
        if state == seen:
            break
        seen = state
    return time.perf_counter() - started


def warm_up() -> None:
    """One viewer opened and drawn first, so neither measured case pays for Qt, vispy and
    the GL context starting up."""
    import napari
    from qtpy.QtWidgets import QApplication

    viewer = napari.Viewer(show=True)
    viewer.add_image(np.zeros((4, 32, 32), np.uint8))
    viewer.add_labels(np.ones((4, 32, 32), np.uint64))
    QApplication.instance().processEvents()
    viewer.screenshot(canvas_only=True, flash=False)
    viewer.close()


def measure(out: Path, pyramid: bool, shots: Path | None) -> dict:
    import napari
    from qtpy.QtWidgets import QApplication

    from psc.plugins.napari._reader import read_zarr

    layers = read_zarr(out)
    if not pyramid:  # level 0 only: what the reader gave before the downsample stage
        layers = [(data[0] if isinstance(data, list) else data, {k: v for k, v in meta.items() if k != "multiscale"},
                   kind) for data, meta, kind in layers]
    viewer = napari.Viewer(show=True)
    viewer.window.resize(900, 900)
    app = QApplication.instance()
    app.processEvents()
    tag = "pyramid" if pyramid else "level0"
    result = {}
    started = time.perf_counter()
    for data, meta, kind in layers:
        meta = dict(meta)
        meta.pop("metadata", None)
        getattr(viewer, f"add_{kind}")(data, **meta)
    result["open"] = time.perf_counter() - started + _settle(
        viewer, app, str(shots / f"{tag}_open.png") if shots else None)
    z = viewer.dims.current_step[0]
    started = time.perf_counter()  # napari slices on the step change itself (sync slicing)
    viewer.dims.current_step = (z + 1, *viewer.dims.current_step[1:])
    result["z step"] = time.perf_counter() - started + _settle(viewer, app)
    viewer.reset_view()
    started = time.perf_counter()
    viewer.camera.zoom = viewer.camera.zoom / 4
    result["zoom out"] = time.perf_counter() - started + _settle(viewer, app, str(shots / f"{tag}_zoomed.png") if shots else None)
    started = time.perf_counter()
    viewer.dims.current_step = (z + 2, *viewer.dims.current_step[1:])
    result["z step zoomed out"] = time.perf_counter() - started + _settle(viewer, app)
    result["levels shown"] = ",".join(str(getattr(layer, "data_level", 0)) for layer in viewer.layers)
    viewer.close()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("/tmp/napari_pyramid.zarr"))
    parser.add_argument("--screenshots", type=Path, default=Path("/tmp"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic run")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from machine import machine_line

    print(machine_line())
    started = time.perf_counter()
    count = make_run(args.out, args.size, args.block)
    print(f"synthetic run {args.size}^3, blocks {args.block}^3, levels 0..{count}: "
          f"{time.perf_counter() - started:.1f} s to write")
    warm_up()
    rows = [(pyramid, measure(args.out, pyramid, args.screenshots)) for pyramid in (False, True)]
    keys = ["open", "z step", "zoom out", "z step zoomed out"]
    print("| layers | " + " | ".join(f"{k} s" for k in keys) + " | level shown (zoomed out) |")
    print("|---|" + "---|" * (len(keys) + 1))
    for pyramid, result in rows:
        what = f"multiscale, levels 0..{count}" if pyramid else "level 0 only"
        print(f"| {what} | " + " | ".join(f"{result[k]:.2f}" for k in keys) + f" | {result['levels shown']} |")
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
