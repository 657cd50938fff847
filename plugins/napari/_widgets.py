"""The dock widgets: Segment, Score and Threshold (magicgui containers).

Each runs its work in a napari ``thread_worker`` and shows a progress bar, so the viewer
stays responsive; results are added to (or swapped into) layers on the main thread when
the worker returns. The computations themselves live in ``_segment`` and ``_scoring``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, Label, ProgressBar, PushButton, Slider, Table
from qtpy.QtCore import QObject, Signal

from ._compat import camera
from ._reader import em_layer, label_features, tissue_colormap
from ._scoring import ErrorSite

MRI, EM = "MRI", "EM"
AUTO, DICE, VI = "auto", "Dice per class (MRI)", "VI / Rand (EM)"
ERROR_ROWS = 10  # worst false merges and false splits listed, each


def psc_meta(layer) -> dict:
    return dict((getattr(layer, "metadata", None) or {}).get("psc") or {})


def _unwrap(obj):
    """The viewer napari hands a plugin widget is a proxy; the widget uses only public
    API, and the real objects compare equal to the layers in the viewer's list."""
    return getattr(obj, "__wrapped__", obj)


def layer_affine(layer) -> np.ndarray:
    """The voxel -> world (mm) affine of an MRI layer: the source scan's if the reader
    set it, else from the layer's scale and translate."""
    meta = psc_meta(layer)
    if "affine" in meta:
        return np.asarray(meta["affine"], dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = np.diag(np.asarray(layer.scale, dtype=np.float64)[-3:])
    affine[:3, 3] = np.asarray(layer.translate, dtype=np.float64)[-3:]
    return affine


def devices() -> list[str]:
    import torch

    return ["auto", "cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


class _Relay(QObject):
    """Carries progress from the worker thread to the widget: a Qt signal emitted in
    another thread is delivered in the receiver's (the main) thread."""

    progress = Signal(int, int, str)


class _Panel(Container):
    """A container with a progress bar and a status line that runs jobs in a thread_worker."""

    def __init__(self, napari_viewer, widgets: list, **kwargs) -> None:
        self.viewer = _unwrap(napari_viewer)
        self.bar = ProgressBar(value=0, min=0, max=1, label="progress")
        self.status = Label(value="")
        super().__init__(widgets=[*widgets, self.bar, self.status], **kwargs)
        for label in (w for w in self if isinstance(w, Label)):
            label.native.setWordWrap(True)
        self._relay = _Relay()
        self._relay.progress.connect(self._show_progress)
        self.worker = None
        self._buttons: list[PushButton] = [w for w in widgets if isinstance(w, PushButton)]

    def _layers(self, kind: str, where: Callable[[Any], bool] | None = None) -> list[tuple[str, Any]]:
        """(name, layer) choices: the viewer's ``image`` or ``labels`` layers."""
        from napari.layers import Image, Labels

        cls = {"image": Image, "labels": Labels}[kind]
        return [(layer.name, layer) for layer in self.viewer.layers
                if isinstance(layer, cls) and (where is None or where(layer))]

    def report(self, done: int, total: int, text: str = "") -> None:
        """Progress from any thread."""
        self._relay.progress.emit(int(done), int(total), text)

    def _show_progress(self, done: int, total: int, text: str) -> None:
        self.bar.max = max(total, 1)
        self.bar.value = min(done, self.bar.max)
        if text:
            self.status.value = text

    def launch(self, function: Callable[[], Any], on_result: Callable[[Any], None], text: str):
        """Run ``function`` in a thread_worker; ``on_result`` gets its value on the main thread."""
        from napari.qt.threading import thread_worker

        self.bar.value, self.bar.max = 0, 0  # 0..0: Qt shows a busy bar until progress comes
        self.status.value = text
        for button in self._buttons:
            button.enabled = False
        worker = thread_worker(function, start_thread=False, ignore_errors=True)()
        worker.returned.connect(on_result)
        worker.errored.connect(self._failed)
        worker.finished.connect(self._finished)
        self.worker = worker
        worker.start()
        return worker

    def _failed(self, error: BaseException) -> None:
        from napari.utils.notifications import show_error

        self.status.value = f"error: {error}"
        show_error(f"psc: {error}")

    def _finished(self) -> None:
        for button in self._buttons:
            button.enabled = True
        if self.bar.max == 0:  # no progress reported: the job was one step
            self.bar.max = self.bar.value = 1
        self.worker = None


# --- Segment --------------------------------------------------------------------------

class SegmentWidget(_Panel):
    """Pick an image layer, a pipeline (MRI/EM), a model and a device; the result is
    added as a Labels overlay (MRI: tissue labels; EM: the run's segmentation)."""

    def __init__(self, napari_viewer) -> None:
        from ._segment import default_weights

        self.viewer = _unwrap(napari_viewer)  # before the combo boxes, which list its layers
        self.image = ComboBox(label="image", choices=lambda _: self._layers("image"))
        self.pipeline = ComboBox(label="pipeline", choices=[MRI, EM], value=MRI)
        self.weights = FileEdit(label="model", mode="r", filter="*.pt", value=default_weights("mri"))
        self.device = ComboBox(label="device", choices=devices(), value="auto")
        self.skull_strip = ComboBox(label="skull strip", choices=["auto", "on", "off"], value="auto",
                                    tooltip="brain extraction (deepbet) before MRI segmentation; auto: only when "
                                            "the image is not already skull-stripped; the mask is added as a layer")
        self.output = FileEdit(label="EM output", mode="w", filter="*.zarr", value="",
                               tooltip="OUT.zarr of the EM run (default: beside the raw container, "
                                       "or a temporary folder for data not read from zarr)")
        self.overwrite = CheckBox(label="overwrite", value=False, tooltip="start the EM run over if OUT.zarr exists")
        self.button = PushButton(text="Segment")
        super().__init__(napari_viewer, [self.image, self.pipeline, self.weights, self.device, self.skull_strip,
                                         self.output, self.overwrite, self.button])
        self.image.changed.connect(self._guess_pipeline)
        self.pipeline.changed.connect(self._pipeline_changed)
        self.button.changed.connect(self.run)
        self._guess_pipeline()
        self._pipeline_changed()

    def _guess_pipeline(self, *_) -> None:
        layer = self.image.value
        if layer is None:
            return
        kind = psc_meta(layer).get("kind")
        if kind is None:
            units = [str(u) for u in getattr(layer, "units", ())]
            kind = "em" if any("nanometer" in u for u in units) else "mri"
        self.pipeline.value = EM if kind == "em" else MRI

    def _pipeline_changed(self, *_) -> None:
        from ._segment import default_weights

        em = self.pipeline.value == EM
        if Path(self.weights.value) in (default_weights("mri"), default_weights("em")):
            self.weights.value = default_weights("em" if em else "mri")
        self.output.visible = self.overwrite.visible = em
        self.skull_strip.visible = not em

    def run(self, *_):
        """Segment the chosen image layer (the button's action)."""
        from ._segment import segment_em, segment_mri

        layer = self.image.value
        if layer is None:
            self.status.value = "no image layer to segment"
            return None
        weights, device = Path(self.weights.value), self.device.value
        data = layer.data
        if self.pipeline.value == MRI:
            affine = layer_affine(layer)
            function = partial(segment_mri, data, affine, weights, device, self.report,
                               skull_strip=self.skull_strip.value)
            return self.launch(function, partial(self._add_mri, layer, affine), f"segmenting {layer.name} (MRI)")
        meta = psc_meta(layer)
        raw = None
        if meta.get("kind") == "em" and meta.get("array") and not meta.get("run"):
            raw = str(Path(meta["path"]) / meta["array"])
        output = str(self.output.value)
        out = output if output not in ("", ".") else None
        function = partial(segment_em, raw, out, weights, device, data=data, voxel_size=tuple(layer.scale[-3:]),
                           offset=tuple(layer.translate[-3:]), overwrite=self.overwrite.value, progress=self.report)
        return self.launch(function, partial(self._add_em, layer), f"segmenting {layer.name} (EM)")

    def _add_mri(self, image, affine: np.ndarray, result) -> None:
        labels, names, brain, warnings = result
        grid = {"scale": image.scale, "translate": image.translate, "units": image.units,
                "axis_labels": image.axis_labels}
        if brain is not None:  # the brain psc extracted (deepbet): a layer, below the tissue labels
            self.viewer.add_labels(brain.astype(np.uint8), name=f"{image.name} brain mask", opacity=0.25,
                                   metadata={"psc": {"kind": "mri", "role": "brain_mask",
                                                     "affine": np.asarray(affine).tolist()}}, **grid)
        meta = {"kind": "mri", "role": "dseg", "affine": np.asarray(affine).tolist(),
                "labels": {str(k): v for k, v in names.items()}, "warnings": list(warnings)}
        self.viewer.add_labels(labels, name=f"{image.name} dseg", features=label_features(names),
                               colormap=tissue_colormap(names), opacity=0.5, metadata={"psc": meta}, **grid)
        extracted = "; brain extracted" if brain is not None else ""
        flagged = f"; {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else ""
        self.status.value = f"{image.name}: {', '.join(n for i, n in names.items() if i)} labelled{extracted}{flagged}"
        if warnings:  # never silently wrong: as psc-segment's stderr lines, and in the layer's metadata
            from napari.utils.notifications import show_warning

            for warning in warnings:
                show_warning(f"psc: {image.name}: {warning}")

    def _add_em(self, image, out) -> None:
        from psc.pipelines.em.layout import SEGMENTATION, RunSettings

        data, kwargs, _ = em_layer(out, SEGMENTATION, run=out, layer_name=f"{image.name} segmentation")
        warnings = RunSettings.load(out).warnings  # the raw's intensities, one segment: as psc-segment prints them
        kwargs.setdefault("metadata", {}).setdefault("psc", {})["warnings"] = list(warnings)
        self.viewer.add_labels(data, **kwargs)
        flagged = f"; {len(warnings)} warning{'s' if len(warnings) != 1 else ''}" if warnings else ""
        self.status.value = f"EM run in {out}{flagged}"
        if warnings:
            from napari.utils.notifications import show_warning

            for warning in warnings:
                show_warning(f"psc: {image.name}: {warning}")


# --- Score ----------------------------------------------------------------------------

GT_HINTS = ("gt", "truth", "labels", "_seg", "manual")


class ScoreWidget(_Panel):
    """Score a prediction against ground truth (both Labels layers): Dice per class for
    MRI; VI split/merge and adapted Rand for EM, with the worst false merges and false
    splits listed: clicking a row centres the view on that error."""

    def __init__(self, napari_viewer) -> None:
        self.viewer = _unwrap(napari_viewer)
        self.prediction = ComboBox(label="prediction", choices=lambda _: self._layers("labels"))
        self.truth = ComboBox(label="ground truth", choices=lambda _: self._layers("labels"))
        self.metric = ComboBox(label="metric", choices=[AUTO, DICE, VI], value=AUTO)
        self.button = PushButton(text="Score")
        self.summary = Label(value="")
        self.table = Table()
        self.table.read_only = True
        super().__init__(napari_viewer, [self.prediction, self.truth, self.metric, self.button, self.summary,
                                         self.table])
        self.errors: list[ErrorSite] = []
        self.result: Any = None
        self._scored: tuple[Any, Any] | None = None
        self.button.changed.connect(self.run)
        self.table.native.cellClicked.connect(lambda row, _column: self.centre_on(row))
        self.table.native.verticalHeader().setVisible(False)
        self.native.setMinimumWidth(420)  # room for the error table's columns
        self._pick_defaults()

    def reset_choices(self, *args) -> None:
        super().reset_choices(*args)
        self._pick_defaults()

    def _pick_defaults(self) -> None:
        """Ground truth: a layer named like one (gt, labels, truth); prediction: another."""
        layers = [layer for _, layer in self._layers("labels")]
        if len(layers) < 2 or self.prediction.value is not self.truth.value:
            return
        gt = next((layer for layer in layers if any(h in layer.name.lower() for h in GT_HINTS)
                   and psc_meta(layer).get("role") != "dseg" and psc_meta(layer).get("array") != "segmentation"),
                  layers[0])
        self.truth.value = gt
        self.prediction.value = next(layer for layer in reversed(layers) if layer is not gt)

    def metric_for(self, prediction, truth) -> str:
        if self.metric.value != AUTO:
            return self.metric.value
        kinds = {psc_meta(prediction).get("kind"), psc_meta(truth).get("kind")}
        if "em" in kinds:
            return VI
        if "mri" in kinds:
            return DICE
        return VI if np.dtype(prediction.data.dtype).itemsize >= 4 else DICE

    def run(self, *_):
        """Score the chosen layers (the button's action)."""
        from ._scoring import dice_table, score_em

        prediction, truth = self.prediction.value, self.truth.value
        if prediction is None or truth is None:
            self.status.value = "pick a prediction and a ground-truth Labels layer"
            return None
        if tuple(prediction.data.shape) != tuple(truth.data.shape):
            self.status.value = (f"{prediction.name} {tuple(prediction.data.shape)} and {truth.name} "
                                 f"{tuple(truth.data.shape)} differ in shape")
            return None
        metric = self.metric_for(prediction, truth)
        self._scored = (prediction, truth)
        if metric == DICE:
            names = self._names(prediction) or self._names(truth)
            function = partial(dice_table, prediction.data, truth.data, names)
            return self.launch(function, self._show_dice, f"Dice of {prediction.name} against {truth.name}")
        progress = lambda done, total: self.report(done, total, "scoring")  # noqa: E731
        function = partial(score_em, prediction.data, truth.data, ERROR_ROWS, progress)
        return self.launch(function, self._show_em, f"VI / Rand of {prediction.name} against {truth.name}")

    @staticmethod
    def _names(layer) -> dict[int, str]:
        features = layer.features
        if features is None or "name" not in features:
            return {}
        index = features["index"] if "index" in features else range(len(features))
        return {int(i): str(n) for i, n in zip(index, features["name"])}

    def _show_dice(self, rows: list[tuple[int, str, float]]) -> None:
        self.result, self.errors = rows, []
        present = [dice for _, _, dice in rows if not np.isnan(dice)]
        mean = float(np.mean(present)) if present else float("nan")
        self.summary.value = f"mean Dice {mean:.4f} over {len(present)} classes"
        self.table.value = {"data": [[label, name, f"{dice:.4f}"] for label, name, dice in rows],
                            "index": list(range(1, len(rows) + 1)), "columns": ["label", "tissue", "Dice"]}
        self.table.native.resizeColumnsToContents()
        self.status.value = "done"

    def _show_em(self, result) -> None:
        self.result = result
        s = result.scores
        self.summary.value = (f"VI split {s['voi_split']:.4f}, VI merge {s['voi_merge']:.4f} bits\n"
                              f"adapted Rand error {s['adapted_rand_error']:.4f}")
        self.errors = result.merges + result.splits
        def share(site) -> str:  # of VI merge for a merge, of VI split for a split
            total = s["voi_merge"] if site.kind == "merge" else s["voi_split"]
            return f"{100 * site.bits / total:.1f}%" if total > 0 else ""

        rows = [[site.kind, *site.ids(), site.voxels, share(site)] for site in self.errors]
        self.table.value = {"data": rows, "index": list(range(1, len(rows) + 1)),
                            "columns": ["error", "segment", "ground truth", "voxels", "VI share"]}
        for row, site in enumerate(self.errors):
            for column in range(self.table.native.columnCount()):
                self.table.native.item(row, column).setToolTip(site.describe())
        self.table.native.resizeColumnsToContents()
        self.status.value = (f"worst {len(result.merges)} false merges, {len(result.splits)} false splits; "
                             "click a row to go there")

    def centre_on(self, row: int) -> None:
        """Centre the view on error ``row`` of the table: the slider and the camera."""
        if not 0 <= row < len(self.errors) or self._scored is None:
            return
        site = self.errors[row]
        if site.centre is None:
            return
        prediction = self._scored[0]
        world = np.asarray(prediction.data_to_world(site.centre), dtype=np.float64)
        ndim = self.viewer.dims.ndim
        axes = list(range(ndim - len(world), ndim))
        self.viewer.dims.set_point(axes, tuple(world))
        point = self.viewer.dims.point
        camera(self.viewer).center = tuple(point[d] for d in self.viewer.dims.displayed)
        if site.kind == "merge":
            prediction.selected_label = site.segment
        self.viewer.layers.selection.active = prediction
        self.status.value = site.describe()


# --- Threshold ------------------------------------------------------------------------

class ThresholdWidget(_Panel):
    """For the segmentation of an EM run: a slider over the agglomeration thresholds the
    run stored; moving it maps the run's fragments through that threshold's lookup table
    (lazily, slice by slice as napari shows them): nothing is recomputed."""

    def __init__(self, napari_viewer) -> None:
        self.viewer = _unwrap(napari_viewer)
        self.segmentation = ComboBox(label="segmentation", choices=lambda _: self._layers(
            "labels", lambda layer: bool(psc_meta(layer).get("run")) and psc_meta(layer).get("array") == "segmentation"))
        self.slider = Slider(label="threshold", min=0, max=0, value=0, readout=False)
        self.value_label = Label(value="")
        super().__init__(napari_viewer, [self.segmentation, self.slider, self.value_label])
        self.thresholds: list[float] = []
        self._lookups: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]] = {}
        self._wanted: float | None = None
        self.segmentation.changed.connect(self._load_run)
        self.slider.changed.connect(self._slid)
        self._load_run()

    @property
    def run_path(self) -> Path | None:
        layer = self.segmentation.value
        return Path(psc_meta(layer)["run"]) if layer is not None else None

    def _load_run(self, *_) -> None:
        from psc.pipelines.em import layout
        from psc.pipelines.em.graph_url import has_graph, open_run_graph
        from psc.utils.errors import InputError

        layer = self.segmentation.value
        if layer is None:
            self.thresholds = []
            self.value_label.value = "no EM run open (a Labels layer of OUT.zarr)"
            return
        out = self.run_path
        settings = layout.RunSettings.load(out)
        if not has_graph(settings.graph, out):
            self.thresholds = []
            self.value_label.value = f"{out.name} has no region graph ({layout.GRAPH_FILE})"
            return
        try:  # the run's recorded graph URL: its SQLite file or its PostgreSQL schema
            graph = open_run_graph(out, settings)
        except InputError as error:  # e.g. the PostgreSQL server is not reachable from here
            self.thresholds = []
            self.value_label.value = str(error)
            return
        try:
            self.thresholds = [float(t) for t in graph.thresholds()]
        finally:
            graph.close()
        if not self.thresholds:
            self.value_label.value = f"{out.name} has no lookup tables yet (run its merge stage)"
            return
        current = psc_meta(layer).get("threshold")
        if current is None:
            settings = layout.RunSettings.load(out)
            current = float(settings.extra.get("relabelled_at", settings.threshold))
            layer.metadata = {**layer.metadata, "psc": {**psc_meta(layer), "threshold": current}}
        index = int(np.argmin([abs(t - current) for t in self.thresholds]))
        with self.slider.changed.blocked():
            self.slider.max = len(self.thresholds) - 1
            self.slider.value = index
        self.value_label.value = f"threshold {self.thresholds[index]:g}"

    def _slid(self, index: int) -> None:
        if 0 <= index < len(self.thresholds):
            self.set_threshold(self.thresholds[index])

    def set_threshold(self, threshold: float):
        """Show the segmentation at a stored ``threshold``: loads its lookup table in a
        worker (once; kept), then swaps the layer's data."""
        layer, out = self.segmentation.value, self.run_path
        if layer is None:
            return None
        self._wanted = threshold
        key = (str(out), float(threshold))
        if key in self._lookups:
            self._apply(layer, out, threshold, self._lookups[key])
            return None

        def load():
            from psc.pipelines.em.graph_url import open_run_graph

            graph = open_run_graph(out)  # a connection of this thread's own
            try:
                return graph.lookup(threshold)
            finally:
                graph.close()

        def loaded(table) -> None:
            self._lookups[key] = table
            if self._wanted == threshold and self.segmentation.value is layer:
                self._apply(layer, out, threshold, table)

        return self.launch(load, loaded, f"loading the lookup table at {threshold:g}")

    def _apply(self, layer, out: Path, threshold: float, table: tuple[np.ndarray, np.ndarray]) -> None:
        import dask.array as da

        from psc.pipelines.em import layout
        from psc.pipelines.em.graph import apply_lookup
        from psc.pipelines.em.volumes import open_volume

        ids, segments = table
        fragments = da.from_zarr(open_volume(out, layout.FRAGMENTS).array)
        layer.data = fragments.map_blocks(partial(apply_lookup, ids=ids, segments=segments), dtype=np.uint64)
        layer.metadata = {**layer.metadata, "psc": {**psc_meta(layer), "threshold": float(threshold)}}
        count = len(np.unique(segments))
        self.value_label.value = f"threshold {threshold:g}: {count} segments"
        self.status.value = ""
