"""The napari plugin in a real viewer (pytest-qt's qtbot, napari's make_napari_viewer),
under Xvfb: readers and writer through napari's plugin machinery, the Segment, Score and
Threshold widgets, sample data, psc-view, and screenshots that must not be blank.

Skipped where napari or pytest-qt is missing or no display can be opened (install
xvfb: pytest-xvfb starts it); CI installs both, so there they run."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
from display import needs_display  # noqa: E402

from psc.pipelines.em import stages as em_stages  # noqa: E402


pytestmark = needs_display

TIMEOUT_MS = 180_000
SCREENSHOTS = os.environ.get("PSC_SCREENSHOTS")  # a folder: also keep the widget screenshots there


def layer(viewer, name):
    return next(lyr for lyr in viewer.layers if lyr.name == name)


def wait_for(qtbot, widget, condition):
    """Wait for the widget's worker to finish and ``condition`` to hold."""
    qtbot.waitUntil(lambda: widget.worker is None and condition(), timeout=TIMEOUT_MS)
    assert not widget.status.value.startswith("error"), widget.status.value


def not_blank(image: np.ndarray, colours: int = 20) -> None:
    rgb = image[..., :3].reshape(-1, 3)
    assert rgb.std() > 10, f"screenshot is flat (std {rgb.std():.1f})"
    assert len(np.unique(rgb, axis=0)) > colours, "screenshot has too few colours"


def keep(viewer, qtbot, name: str, tmp_path: Path) -> np.ndarray:
    """A screenshot of the whole window (widgets included), saved for the docs if asked."""
    qtbot.wait(300)  # let the dock widgets lay out
    image = viewer.screenshot(canvas_only=False, flash=False)
    not_blank(image)
    from skimage.io import imsave

    for folder in filter(None, [tmp_path, SCREENSHOTS]):
        imsave(str(Path(folder) / f"napari_{name}.png"), image, check_contrast=False)
    return image


# --- readers and writer through napari ------------------------------------------------

def test_napari_opens_psc_outputs_with_the_plugin(make_napari_viewer, mri_outputs, em_run):
    viewer = make_napari_viewer()
    viewer.open(str(mri_outputs.scan), plugin="psc")
    viewer.open(str(mri_outputs.probseg), plugin="psc")
    viewer.open(str(mri_outputs.dseg), plugin="psc")
    zooms = np.sqrt((mri_outputs.affine[:3, :3] ** 2).sum(0))
    assert [lyr.name for lyr in viewer.layers] == ["sub", "sub_probseg background", "sub_probseg CSF",
                                                   "sub_probseg GM", "sub_probseg WM", "sub_dseg"]
    dseg = layer(viewer, "sub_dseg")
    assert type(dseg).__name__ == "Labels"
    np.testing.assert_allclose(dseg.scale, zooms)
    np.testing.assert_allclose(dseg.translate, mri_outputs.affine[:3, 3])
    assert list(dseg.features["name"]) == ["background", "CSF", "GM", "WM"]
    assert layer(viewer, "sub_probseg WM").data.shape == mri_outputs.image.shape  # the class axis became channels

    viewer.layers.clear()
    viewer.open(str(em_run.out), plugin="psc")
    names = [lyr.name for lyr in viewer.layers]
    assert names == ["affinities z", "affinities y", "affinities x", "fragments", "segmentation"]
    segmentation = layer(viewer, "segmentation")
    assert type(segmentation).__name__ == "Labels" and type(segmentation.data).__module__.startswith("dask")
    np.testing.assert_allclose(segmentation.scale, (8, 8, 8))
    np.testing.assert_allclose(segmentation.translate, (80, 0, 16))


def test_labels_saved_through_napari_keep_the_affine(make_napari_viewer, mri_outputs, tmp_path):
    import nibabel as nib

    viewer = make_napari_viewer()
    viewer.open(str(mri_outputs.dseg), plugin="psc")
    dseg = layer(viewer, "sub_dseg")
    dseg.data[dseg.data == 1] = 2  # an edit
    written = dseg.save(str(tmp_path / "edited_dseg.nii.gz"), plugin="psc")
    assert str(tmp_path / "edited_dseg.nii.gz") in written
    image = nib.load(str(tmp_path / "edited_dseg.nii.gz"))
    np.testing.assert_allclose(image.affine, mri_outputs.affine, atol=1e-5)
    assert not (np.asarray(image.dataobj) == 1).any()
    dseg.save(str(tmp_path / "edited.zarr"), plugin="psc")
    assert (tmp_path / "edited.zarr" / "sub_dseg").is_dir()


def test_sample_data(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("psc", "em_cube")
    assert [lyr.name for lyr in viewer.layers] == ["synthetic EM", "synthetic EM labels"]
    viewer.open_sample("psc", "t1_brain")
    assert layer(viewer, "MNI152 T1").data.ndim == 3


# --- Segment --------------------------------------------------------------------------

def test_segment_mri_adds_labels_on_the_image_grid(make_napari_viewer, qtbot, mri_outputs, tmp_path):
    from mri_fixtures import save_tiny_model
    from psc.models.weights import load_weights
    from psc.pipelines.mri.inference import segment_scan
    from psc.pipelines.mri.io import read_scan
    from psc.plugins.napari._widgets import MRI, SegmentWidget

    weights = save_tiny_model(tmp_path / "tiny.pt")
    viewer = make_napari_viewer()
    viewer.open(str(mri_outputs.scan), plugin="psc")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    assert widget.image.value is layer(viewer, "sub") and widget.pipeline.value == MRI
    widget.weights.value = weights
    widget.device.value = "cpu"
    widget.run()
    assert widget.worker is not None  # the work runs in a thread_worker
    wait_for(qtbot, widget, lambda: "sub dseg" in [lyr.name for lyr in viewer.layers])

    labels = layer(viewer, "sub dseg")
    assert type(labels).__name__ == "Labels" and labels.data.shape == mri_outputs.image.shape
    np.testing.assert_allclose(labels.scale, layer(viewer, "sub").scale)
    model, card = load_weights(weights)
    expected = segment_scan(read_scan(mri_outputs.scan), model, card, device="cpu").labels
    np.testing.assert_array_equal(labels.data, expected)
    assert list(labels.features["name"]) == ["background", "CSF", "GM", "WM"]
    # A phantom, not an adult brain: psc-segment's plausibility warnings, in the status
    # line and the layer's metadata, not silent.
    warnings = labels.metadata["psc"]["warnings"]
    assert any("GM+WM" in w for w in warnings), warnings
    assert "warning" in widget.status.value
    assert widget.bar.max >= 1 and widget.bar.value == widget.bar.max
    assert widget.button.enabled


def test_segment_em_adds_the_runs_segmentation(make_napari_viewer, qtbot, em_run, tmp_path):
    from psc.pipelines.em.synthetic import make_em_volume
    from psc.plugins.napari._widgets import EM, SegmentWidget

    raw, _ = make_em_volume((24, 32, 32), cell_size=10, seed=3)
    viewer = make_napari_viewer()
    viewer.add_image(raw, name="cube", scale=(8, 8, 8), units="nm", translate=(0, 16, 16))
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    assert widget.pipeline.value == EM  # nanometre units: an EM volume
    widget.weights.value = em_run.weights
    widget.output.value = tmp_path / "cube_psc.zarr"
    widget.run()
    wait_for(qtbot, widget, lambda: "cube segmentation" in [lyr.name for lyr in viewer.layers])

    segmentation = layer(viewer, "cube segmentation")
    assert type(segmentation).__name__ == "Labels" and segmentation.data.shape == raw.shape
    np.testing.assert_allclose(segmentation.translate, (0, 16, 16))
    assert segmentation.metadata["psc"]["run"] == str(tmp_path / "cube_psc.zarr")
    assert np.asarray(segmentation.data).max() >= 1
    assert widget.bar.value == widget.bar.max == len(em_stages.STAGES)  # one step per stage


def test_segment_em_shows_the_runs_warnings(make_napari_viewer, qtbot, em_run, tmp_path):
    """A faint volume (8 grey levels on a 16-bit pedestal): the run warns, and the widget
    says so as psc-segment would, in the status line and the layer's metadata."""
    from psc.pipelines.em.synthetic import make_em_volume
    from psc.plugins.napari._widgets import SegmentWidget

    raw, _ = make_em_volume((24, 32, 32), cell_size=10, seed=3)
    viewer = make_napari_viewer()
    viewer.add_image((30000 + raw.astype(np.uint16) // 32).astype(np.uint16), name="faint", scale=(8, 8, 8),
                     units="nm")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget.weights.value = em_run.weights
    widget.output.value = tmp_path / "faint_psc.zarr"
    widget.run()
    wait_for(qtbot, widget, lambda: "faint segmentation" in [lyr.name for lyr in viewer.layers])
    warnings = layer(viewer, "faint segmentation").metadata["psc"]["warnings"]
    assert any("span" in w for w in warnings) and any("distinct values" in w for w in warnings)
    assert f"{len(warnings)} warnings" in widget.status.value


def test_segment_reports_a_wrong_model_and_stays_usable(make_napari_viewer, qtbot, mri_outputs, em_run):
    from psc.plugins.napari._widgets import SegmentWidget

    viewer = make_napari_viewer()
    viewer.open(str(mri_outputs.scan), plugin="psc")
    widget = SegmentWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Segment")
    widget.weights.value = em_run.weights  # an EM model for an MRI image
    widget.run()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=TIMEOUT_MS)
    assert widget.status.value.startswith("error") and "EM affinity model" in widget.status.value
    assert widget.button.enabled and len(viewer.layers) == 1


# --- Score ----------------------------------------------------------------------------

def test_score_mri_gives_dice_per_class(make_napari_viewer, qtbot, mri_outputs):
    from psc.pipelines.mri.metrics import dice_per_class
    from psc.plugins.napari._widgets import DICE, ScoreWidget

    truth = mri_outputs.truth
    pred = truth.copy()
    pred[:, :12] = np.where(truth[:, :12] == 3, 2, truth[:, :12])
    viewer = make_napari_viewer()
    viewer.open(str(mri_outputs.dseg), plugin="psc")
    viewer.add_labels(pred, name="prediction")
    layer(viewer, "sub_dseg").name = "sub_seg ground truth"
    widget = ScoreWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Score")
    assert widget.truth.value.name == "sub_seg ground truth" and widget.prediction.value.name == "prediction"
    assert widget.metric_for(widget.prediction.value, widget.truth.value) == DICE
    widget.run()
    wait_for(qtbot, widget, lambda: widget.result is not None)
    expected = dice_per_class(pred, truth, [1, 2, 3])
    assert [(c, name) for c, name, _ in widget.result] == [(1, "CSF"), (2, "GM"), (3, "WM")]
    for c, _, dice in widget.result:
        assert dice == pytest.approx(expected[c], nan_ok=True)  # CSF: in neither map, NaN
    assert widget.table.shape == (3, 3) and widget.table.data[2, 2] == f"{expected[3]:.4f}"
    assert "over 2 classes" in widget.summary.value


def test_score_em_lists_the_worst_errors_and_a_click_centres_on_one(make_napari_viewer, qtbot, em_run, tmp_path):
    from qtpy.QtCore import Qt

    from psc.pipelines.em.metrics import evaluate
    from psc.plugins.napari._widgets import ScoreWidget
    from test_napari_io import merged_and_split

    gt = em_run.labels
    pred, a, b, _ = merged_and_split(gt)
    viewer = make_napari_viewer(show=True)
    viewer.open(str(em_run.raw), plugin="psc")  # raw and labels (ground truth), lazily
    viewer.add_labels(pred, name="merged", scale=(8, 8, 8), translate=(80, 0, 16), units="nm")
    widget = ScoreWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Score")
    assert widget.truth.value.name == "labels" and widget.prediction.value.name == "merged"
    widget.run()
    wait_for(qtbot, widget, lambda: widget.result is not None)

    expected = evaluate(pred, gt)
    for key in ("voi_split", "voi_merge", "adapted_rand_error"):
        assert widget.result.scores[key] == pytest.approx(expected[key], abs=1e-12)
    assert f"{expected['voi_merge']:.4f}" in widget.summary.value
    merges = [site for site in widget.errors if site.kind == "merge"]
    assert merges and merges[0].segment == a and b in merges[0].others
    assert widget.table.shape[0] == len(widget.errors) >= 2

    site = merges[0]
    world = np.array([80, 0, 16]) + 8 * np.asarray(site.centre)
    table = widget.table.native
    rect = table.visualItemRect(table.item(0, 0))
    before = viewer.dims.point
    qtbot.mouseClick(table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    np.testing.assert_allclose(viewer.dims.point, world, atol=4)  # within half a voxel
    assert viewer.dims.point != before
    assert layer(viewer, "merged").selected_label == a
    keep(viewer, qtbot, "score", tmp_path)


# --- Threshold ------------------------------------------------------------------------

def test_threshold_slider_swaps_the_lookup_table(make_napari_viewer, qtbot, em_run, tmp_path):
    from psc.pipelines.em.volumes import open_volume
    from psc.plugins.napari.viewer import open_viewer
    from psc.pipelines.em.graph import GraphStore, apply_lookup
    from psc.plugins.napari._widgets import ThresholdWidget

    viewer = make_napari_viewer(show=True)
    open_viewer([em_run.out], viewer=viewer)  # psc-view: raw + run, Threshold docked
    assert [lyr.name for lyr in viewer.layers][:2] == ["raw", "affinities z"]
    widget = next(w for w in viewer.window.dock_widgets.values() if isinstance(w, ThresholdWidget))
    assert widget.thresholds == [0.1, 0.5] and widget.slider.value == 1  # the run's threshold

    fragments = open_volume(em_run.out, "fragments").array[:]
    graph = GraphStore(em_run.out / "graph.sqlite")
    expected = {t: apply_lookup(fragments, *graph.lookup(t)) for t in (0.1, 0.5)}
    graph.close()
    assert len(np.unique(expected[0.1])) > len(np.unique(expected[0.5]))
    segmentation = layer(viewer, "segmentation")
    for index, threshold in ((0, 0.1), (1, 0.5)):
        widget.slider.value = index
        wait_for(qtbot, widget, lambda t=threshold: segmentation.metadata["psc"].get("threshold") == t)
        np.testing.assert_array_equal(np.asarray(segmentation.data), expected[threshold])
        assert f"{len(np.unique(expected[threshold][expected[threshold] > 0]))} segments" in widget.value_label.value
    widget.slider.value = 0
    wait_for(qtbot, widget, lambda: segmentation.metadata["psc"]["threshold"] == 0.1)
    keep(viewer, qtbot, "threshold", tmp_path)


# --- screenshots ----------------------------------------------------------------------

def test_overlay_screenshot_is_not_blank(make_napari_viewer, qtbot, mri_outputs, tmp_path):
    from psc.plugins.napari.viewer import open_viewer
    from psc.plugins.napari._widgets import SegmentWidget

    viewer = make_napari_viewer(show=True)
    open_viewer([mri_outputs.scan], viewer=viewer, widgets=[])
    assert [lyr.name for lyr in viewer.layers][-1] == "sub_dseg"
    viewer.dims.set_point(0, float(np.mean([lyr.extent.world[:, 0] for lyr in viewer.layers], axis=0).mean()))
    overlay = viewer.screenshot(canvas_only=True, flash=False)
    not_blank(overlay)
    layer(viewer, "sub_dseg").visible = False
    plain = viewer.screenshot(canvas_only=True, flash=False)
    assert np.abs(overlay.astype(int) - plain.astype(int)).sum() > 0, "the labels overlay does not show"
    layer(viewer, "sub_dseg").visible = True
    viewer.window.add_dock_widget(SegmentWidget(viewer), name="Segment")
    keep(viewer, qtbot, "segment", tmp_path)
