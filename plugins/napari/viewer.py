"""A napari viewer with psc's inputs and their outputs already overlaid: what ``psc-view``
opens (the command only parses its arguments and calls :func:`open_viewer`).

- a scan ``x.nii.gz`` (or .nii, .mgz): the scan, with ``x_probseg.nii.gz`` (hidden) and
  ``x_dseg.nii.gz`` (tissue labels) from beside it when they exist; a ``_dseg`` or
  ``_probseg`` file brings its scan and the other outputs the same way;
- an EM run ``OUT.zarr``: its raw volume (from the run's settings), the affinities
  (three channels, hidden), fragments (hidden) and the segmentation, plus the raw
  container's ``labels`` (ground truth, hidden) if it has them; the Threshold widget
  is docked;
- a raw container ``RAW.zarr``: its arrays, and the run ``RAW_psc.zarr`` beside it if
  psc-segment made one (its default output name);
- ``x.zarr/NAME``: that one array (``OUT.zarr/segmentation``: that image of a run,
  wherever the run keeps it).

EM arrays open lazily: a volume larger than memory opens at once and scrolls.
:func:`collect` and :func:`describe` need no napari (``psc-view --dry-run``).
"""

from __future__ import annotations

from pathlib import Path

from psc.utils.errors import InputError

from . import _reader as reader

WIDGETS = {"segment": "Segment", "score": "Score", "threshold": "Threshold (EM)"}  # psc-view --widget NAME


def _psc(meta: dict) -> dict:
    """What psc's reader records about a layer (``metadata["psc"]``)."""
    return (meta.get("metadata") or {}).get("psc") or {}


def layers_for(path: str | Path) -> list[tuple]:
    """napari layer data tuples for one input and its psc outputs."""
    from psc.pipelines.em.layout import default_output
    from psc.pipelines.em.volumes import container_arrays
    from psc.pipelines.mri.outputs import outputs_beside

    path = Path(path)
    if reader.is_mri_path(path):
        layers = []
        for item in outputs_beside(path):
            layers += reader.read_mri(item)
        return layers
    if reader.is_em_run(path):
        layers = reader.em_run_layers(path)
        raw = reader.run_raw(path)
        if raw is not None and "labels" in container_arrays(raw[0]) and raw[1] != "labels":
            data, meta, kind = reader.em_layer(raw[0], "labels", layer_name="labels (ground truth)")
            layers.append((data, {**meta, "visible": False}, kind))
        return layers
    if reader.is_volume_path(path):
        layers = reader.read_zarr(path)
        run = default_output(path)
        if path.name.endswith(".zarr") and reader.is_em_run(run):
            layers += reader.read_zarr(run)
        return layers
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    raise InputError(f"{path}: not a scan (NIfTI, MGZ) or a zarr container that psc can read")


def _source(meta: dict) -> tuple:
    psc = _psc(meta)
    path = psc.get("path")
    return (str(Path(path).resolve()) if path else None, psc.get("array"))


def collect(paths: list[str | Path]) -> list[tuple]:
    """Layers for every input, each source once (``RAW.zarr RAW_psc.zarr`` shows raw once)."""
    layers, seen = [], set()
    for path in paths:
        for data, meta, kind in layers_for(path):
            key = _source(meta)
            if key[0] is not None and key in seen:
                continue
            seen.add(key)
            layers.append((data, meta, kind))
    return layers


def describe(layer: tuple) -> str:
    """One line per layer: type, name(s), shape, dtype, laziness, geometry, visibility."""
    data, meta, kind = layer
    names = meta.get("name")
    names = ", ".join(names) if isinstance(names, list) else names
    scale = meta.get("scale")
    unit = meta.get("units") or ""
    geometry = f"scale {' x '.join(f'{s:g}' for s in scale)} {unit}".rstrip() if scale is not None else ""
    if meta.get("translate") is not None and any(meta["translate"]):
        geometry += f" at ({', '.join(f'{t:g}' for t in meta['translate'])})"
    lazy = " lazy" if type(data).__module__.startswith("dask") else ""
    hidden = " hidden" if meta.get("visible") is False or (isinstance(meta.get("visible"), list)
                                                            and not any(meta["visible"])) else ""
    return f"{kind:6} {names}  {tuple(data.shape)} {data.dtype}{lazy}  {geometry}{hidden}"


def add_layers(viewer, layers: list[tuple]) -> list:
    added = []
    for data, meta, kind in layers:
        result = getattr(viewer, f"add_{kind}")(data, **meta)
        added += result if isinstance(result, list) else [result]
    return added


def axial_view(viewer, axcodes: str) -> None:
    """Show axial slices of a 3-D scan whose voxel axes point along ``axcodes`` (e.g.
    ``RAS``): anterior up and the patient's left on the left, as psc's QC images."""
    from ._compat import camera

    axis = {pair: [i for i, c in enumerate(axcodes) if c in pair] for pair in ("LR", "AP", "SI")}
    if viewer.dims.ndim != 3 or any(len(found) != 1 for found in axis.values()):
        return
    axis = {pair: found[0] for pair, found in axis.items()}
    viewer.dims.order = (axis["SI"], axis["AP"], axis["LR"])
    camera(viewer).orientation2d = ("up" if axcodes[axis["AP"]] == "A" else "down",
                                   "right" if axcodes[axis["LR"]] == "R" else "left")


def open_viewer(paths: list[str | Path], viewer=None, widgets: list[str] | None = None, title: str = "psc"):
    """Add the layers of ``paths`` to ``viewer`` (a new one, titled ``title`` and the
    inputs' names, by default) and dock ``widgets`` (names of ``WIDGETS``; default:
    Threshold when an EM run is open); returns the viewer."""
    import napari

    layers = collect(paths)
    viewer = viewer or napari.Viewer(title=f"{title}: {' '.join(Path(p).name for p in paths)}")
    add_layers(viewer, layers)
    if widgets is None:
        widgets = ["threshold"] if any(_psc(meta).get("run") for _, meta, _ in layers) else []
    for name in widgets:
        viewer.window.add_plugin_dock_widget("psc", WIDGETS[name])
    segmentations = [layer for layer in viewer.layers if _psc({"metadata": layer.metadata}).get("role") == "dseg"
                     or _psc({"metadata": layer.metadata}).get("array") == "segmentation"]
    if segmentations:  # the layer one looks at (and edits) first
        viewer.layers.selection.active = segmentations[-1]
    if {_psc(meta).get("kind") for _, meta, _ in layers} == {"mri"}:
        axial_view(viewer, _psc(layers[0][1])["axcodes"])
    viewer.reset_view()
    return viewer
