"""Make the screenshots of docs/napari.md: one per widget, in a real napari window.

    xvfb-run -s "-screen 0 1600x1000x24" python -m psc.plugins.napari._docs_screenshots docs/images \\
        --em-raw RAW.zarr [--em-weights WEIGHTS.pt] [--threshold 0.3] [--score-threshold 0.5]

- ``napari_segment.png``: the MNI152 T1 sample segmented by the shipped MRI model in the
  Segment widget;
- ``napari_threshold.png``: an EM run on RAW.zarr (its ``raw``; made in a temporary
  folder) opened as psc-view opens it, the Threshold slider at ``--threshold``;
- ``napari_score.png``: that segmentation, at ``--score-threshold``, scored against
  RAW.zarr's ``labels``, the view centred on the worst false merge.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _wait(widget) -> None:
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    while widget.worker is not None:
        app.processEvents()
        time.sleep(0.05)
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    if widget.status.value.startswith("error"):
        raise RuntimeError(widget.status.value)


def _save(viewer, path: Path) -> None:
    from skimage.io import imsave

    _wait_ui()
    imsave(str(path), viewer.screenshot(canvas_only=False, flash=False), check_contrast=False)
    print(path)


def _wait_ui(seconds: float = 1.0) -> None:
    from qtpy.QtWidgets import QApplication

    end = time.time() + seconds
    while time.time() < end:
        QApplication.instance().processEvents()
        time.sleep(0.02)


def segment_mri(folder: Path, size: tuple[int, int]) -> None:
    import napari

    from ._sample_data import t1_brain
    from .viewer import add_layers, axial_view
    from ._widgets import SegmentWidget

    viewer = napari.Viewer(title="psc: Segment")
    viewer.window.resize(*size)
    layers = t1_brain()
    add_layers(viewer, layers)
    axial_view(viewer, layers[0][1]["metadata"]["psc"]["axcodes"])
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment (psc)")
    widget.device.value = "cpu"
    widget.run()
    _wait(widget)
    viewer.dims.set_point(2, 8.0)  # an axial slice through the ventricles (z = 8 mm)
    viewer.reset_view()
    _save(viewer, folder / "napari_segment.png")
    viewer.close()


def em(folder: Path, raw: Path, weights: Path, threshold: float, score_threshold: float,
       size: tuple[int, int]) -> None:
    import napari
    import numpy as np

    from psc.pipelines.em.layout import default_output

    from ._segment import segment_em
    from ._widgets import ScoreWidget, ThresholdWidget
    from .viewer import open_viewer

    out = Path(tempfile.mkdtemp(prefix="psc-screenshots-")) / default_output(raw).name
    segment_em(str(raw / "raw"), out, weights, device="cpu", progress=lambda d, t, s: print(f"  {s} {d}/{t}"))
    viewer = napari.Viewer(title="psc-view")
    viewer.window.resize(*size)
    open_viewer([out], viewer=viewer)
    middle = viewer.dims.range[0]
    viewer.dims.set_point(0, (middle.start + middle.stop) / 2)
    thresholds = next(w for w in viewer.window.dock_widgets.values() if isinstance(w, ThresholdWidget))

    def slide_to(value: float) -> None:
        thresholds.slider.value = int(np.argmin([abs(t - value) for t in thresholds.thresholds]))
        _wait(thresholds)

    slide_to(threshold)
    _save(viewer, folder / "napari_threshold.png")
    slide_to(score_threshold)

    viewer.window.remove_dock_widget("all")
    score = ScoreWidget(viewer)
    viewer.window.add_dock_widget(score, name="Score (psc)")
    score.prediction.value = next(lyr for lyr in viewer.layers if lyr.name == "segmentation")
    score.truth.value = next(lyr for lyr in viewer.layers if lyr.name.startswith("labels"))
    score.run()
    _wait(score)
    score.centre_on(0)
    score.table.native.selectRow(0)
    _save(viewer, folder / "napari_score.png")
    viewer.close()


def main(argv: list[str] | None = None) -> int:
    from psc.models.shipped import ShippedWeights

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--em-raw", type=Path, help="RAW.zarr with raw and labels (skip the EM images without)")
    parser.add_argument("--em-weights", type=Path, default=ShippedWeights.EM_AFFINITY.value.path)
    parser.add_argument("--threshold", type=float, default=0.3, help="of the Threshold screenshot")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="of the segmentation scored")
    parser.add_argument("--size", type=int, nargs=2, default=(1400, 820))
    parser.add_argument("--skip-mri", action="store_true")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    if not args.skip_mri:
        segment_mri(args.folder, tuple(args.size))
    if args.em_raw:
        em(args.folder, args.em_raw, args.em_weights, args.threshold, args.score_threshold, tuple(args.size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
