"""Readers: psc's MRI outputs (NIfTI/MGZ) and the EM pipeline's OME-Zarr containers as
napari layer data tuples ``(data, kwargs, layer_type)``.

MRI: a scan is an image with its voxel sizes as ``scale`` and the affine's origin as
``translate`` (mm; world = RAS for an axis-aligned scan); ``*_dseg`` files are Labels
with the tissue names (from the ``_dseg.tsv`` beside them, else psc's own) in
``features`` and psc's overlay colours; ``*_probseg`` files (4-D, classes last) open
with the class axis as napari's channel axis, one image layer per class. The full
affine travels in ``metadata["psc"]["affine"]`` so the writer puts labels back on the
scan's exact grid.

EM: every array of a container (``RAW.zarr``, or the images of a run's ``OUT.zarr``,
whichever layout it has: ``volumes.array_names``) or a single array (``x.zarr/NAME``;
``OUT.zarr/segmentation`` names a run's image) becomes a lazy dask array (nothing is
read until a slice is shown), placed in nanometres by its ``voxel_size`` and ``offset``:
raw as an image, affinities as three channels (z, y, x), fragments, segmentation and
labels as Labels. A layer records the image's name (``metadata["psc"]["array"]``), not
where the run keeps it, and opens it through ``volumes.open_volume`` (``volumes.locate``).
A run's image with resolution levels (the downsample stage's ``1..L``) opens as a
multiscale layer: a list of lazy arrays, level 0 first, which napari reads at the level
that fits the screen, so a volume of hundreds of GB opens zoomed out without reading
level 0 (docs/napari.md, docs/benchmarks.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from nibabel.affines import voxel_sizes

from psc.pipelines.em.volumes import array_names, is_volume_path, is_zarr_path, open_node, split_run_path
from psc.pipelines.mri.config import LABELS, OTHER_LABEL_COLOUR, label_colour
from psc.pipelines.mri.io import NIBABEL_EXTENSIONS, scan_stem
from psc.pipelines.mri.outputs import OUTPUT_SUFFIXES, label_table_path, read_label_table, role, subject_stem

LayerData = tuple[Any, dict, str]

LABEL_ARRAYS = ("fragments", "segmentation", "labels", "gt", "ground_truth", "seg")
AFFINITY_AXES = ("z", "y", "x")
AFFINITY_COLOURS = ("red", "green", "blue")


# --- what a path is -------------------------------------------------------------------

def is_mri_path(path: str | os.PathLike) -> bool:
    """A file napari opens with this reader as MRI: what nibabel reads (NIfTI, MGZ)."""
    return str(path).lower().endswith(NIBABEL_EXTENSIONS) and Path(path).is_file()


def tissue_colormap(names: dict[int, str]) -> dict:
    """napari's Labels colormap for ``names``: psc's tissue colours
    (``psc.pipelines.mri.config.LABEL_COLOURS``, the QC picture's), background
    transparent, any other label grey; so napari shows what the PNG shows."""
    colours = {None: (*OTHER_LABEL_COLOUR, 1.0), 0: (0.0, 0.0, 0.0, 0.0)}
    colours.update({index: (*label_colour(index), 1.0) for index in names if index != 0})
    return colours


# --- npe2 reader command --------------------------------------------------------------

def napari_get_reader(path: str | list[str]) -> Callable[[Any], list[LayerData]] | None:
    """The npe2 ``get_reader`` command: a reader function if psc can read ``path``."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(is_mri_path(p) or is_volume_path(p) for p in paths):
        return None
    return read


def read(path: str | list[str]) -> list[LayerData]:
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerData] = []
    for item in paths:
        layers += read_mri(item) if is_mri_path(item) else read_zarr(item)
    return layers


# --- MRI ------------------------------------------------------------------------------

def mri_geometry(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(scale, translate) of a voxel -> world affine: voxel sizes (column norms) and origin, mm."""
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in voxel_sizes(affine)), tuple(float(v) for v in affine[:3, 3])


def tissue_names(path: str | os.PathLike, values: np.ndarray | None = None) -> dict[int, str]:
    """Names of a dseg's labels: its ``<stem>.tsv`` sidecar (``index<TAB>name``, what
    psc-segment writes), else psc's tissue classes."""
    names = read_label_table(label_table_path(path))
    if not names:
        names = dict(LABELS)
    if values is not None:  # labels in the data but not named
        for value in values:
            names.setdefault(int(value), f"label {int(value)}")
    return dict(sorted(names.items()))


def label_features(names: dict[int, str]) -> dict[str, list]:
    """napari's Labels ``features``: one row per label, the ``index`` column says which."""
    return {"index": list(names), "name": list(names.values())}


def read_mri(path: str | os.PathLike) -> list[LayerData]:
    import nibabel as nib

    path = Path(path)
    image = nib.load(str(path))
    data = np.asanyarray(image.dataobj)  # a memory map for uncompressed .nii
    while data.ndim > 3 and data.shape[-1] == 1 and role(path) != "probseg":
        data = data[..., 0]
    affine = np.asarray(image.affine, dtype=np.float64)
    scale, translate = mri_geometry(affine)
    kind, stem = role(path), scan_stem(path)
    axcodes = "".join(nib.orientations.aff2axcodes(affine))
    psc = {"kind": "mri", "role": kind, "path": str(path), "affine": affine.tolist(), "axcodes": axcodes}
    common = {"scale": scale, "translate": translate, "units": "mm", "axis_labels": ("i", "j", "k"),
              "metadata": {"psc": psc}}
    if kind == "dseg":
        labels = np.asarray(data)
        if not np.issubdtype(labels.dtype, np.integer):
            labels = np.rint(labels).astype(np.int32)
        names = tissue_names(path, np.unique(labels))
        psc["labels"] = {str(k): v for k, v in names.items()}
        return [(labels, {**common, "name": stem, "features": label_features(names),
                          "colormap": tissue_colormap(names), "opacity": 0.5}, "labels")]
    if kind == "probseg" and data.ndim == 4:
        dseg_names = tissue_names(path.with_name(subject_stem(path) + OUTPUT_SUFFIXES["dseg"]))
        classes = data.shape[3]
        names = [f"{stem} {dseg_names.get(c, f'class {c}')}" for c in range(classes)]
        psc["labels"] = {str(c): dseg_names.get(c, f"class {c}") for c in range(classes)}
        return [(data, {**common, "name": names, "channel_axis": 3, "contrast_limits": [(0.0, 1.0)] * classes,
                        "colormap": ["gray", "blue", "red", "yellow", "green", "magenta", "cyan"][:classes]
                        if classes <= 7 else None, "blending": "additive", "visible": [False] * classes},
                 "image")]
    if data.ndim != 3:
        # e.g. a 4-D series: napari shows the extra axis as a slider
        common = {**common, "scale": scale + (1.0,) * (data.ndim - 3), "translate": translate + (0.0,) * (data.ndim - 3),
                  "units": None, "axis_labels": None}
    return [(data, {**common, "name": stem, "colormap": "gray"}, "image")]


# --- EM (zarr) ------------------------------------------------------------------------

def is_em_run(path: str | os.PathLike) -> bool:
    """An ``OUT.zarr`` of ``psc-segment``: its group carries the run's settings."""
    if not is_zarr_path(path):
        return False
    try:
        import zarr

        node = open_node(path)
        return isinstance(node, zarr.Group) and "psc" in node.attrs
    except Exception:
        return False


def _order(names: list[str]) -> list[str]:
    """Raw and images first (bottom of the layer list), then affinities, fragments, the
    segmentation, and ground truth on top."""
    rank = {"raw": 0, "affinities": 2, "fragments": 3, "segmentation": 4, "labels": 5}
    return sorted(names, key=lambda name: (rank.get(name, 1), name))


def read_zarr(path: str | os.PathLike, names: list[str] | None = None) -> list[LayerData]:
    """Layers for a container (each array in it, or ``names``) or for one array."""
    import zarr

    path = Path(path)
    split = split_run_path(path)  # OUT.zarr/segmentation: the run's image by its name
    if split is not None:
        return [em_layer(split[0], split[1], run=split[0] if is_em_run(split[0]) else None)]
    node = open_node(path)
    if isinstance(node, zarr.Array):
        return [em_layer(path.parent, path.name, layer_name=_level_title(path))]
    run = "psc" in node.attrs
    layers = [em_layer(path, name, run=path if run else None) for name in _order(names or array_names(node))]
    return layers


def _level_title(path: Path) -> str | None:
    """``labels/segmentation/0`` of an OME-Zarr image is titled by its image's name
    (``segmentation``; ``segmentation level 1`` for a lower resolution), not ``0``."""
    if not path.name.isdigit():
        return None
    try:
        entries = open_node(path.parent).attrs.get("ome", {}).get("multiscales", [])
        name = entries[0].get("name") if entries else None
    except Exception:  # no group above, or not one psc can read: the array's own name
        return None
    if not name:
        return None
    return name if path.name == "0" else f"{name} level {path.name}"


def em_layer(container: str | os.PathLike, name: str, run: str | os.PathLike | None = None,
             layer_name: str | None = None) -> LayerData:
    """One array of a psc zarr container as a lazy layer in nanometres."""
    import dask.array as da

    from psc.pipelines.em.volumes import open_volume

    container = Path(container)
    volume = open_volume(container, name)
    data = da.from_zarr(volume.array)
    lower = _lower_levels(container, name)
    base = data
    if lower:  # napari's multiscale data: level 0 first; it places the levels by their shapes
        data = [data, *(da.from_zarr(array) for array in lower)]
    psc = {"kind": "em", "path": str(container), "array": name}
    if run is not None:
        psc["run"] = str(run)
    spatial = {"scale": tuple(volume.voxel_size), "translate": tuple(volume.offset), "units": "nm",
               "axis_labels": ("z", "y", "x"), "metadata": {"psc": psc}}
    if lower:
        spatial["multiscale"] = True
        psc["levels"] = 1 + len(lower)
    title = layer_name or name
    if volume.channels:
        channels = volume.channels
        axes = AFFINITY_AXES if channels == 3 else tuple(f"c{i}" for i in range(channels))
        limits = (0.0, 255.0) if base.dtype == np.uint8 else (0.0, 1.0)
        return (data, {**spatial, "name": [f"{title} {axis}" for axis in axes], "channel_axis": 0,
                       "colormap": list(AFFINITY_COLOURS) if channels == 3 else None,
                       "contrast_limits": [limits] * channels, "blending": "additive",
                       "visible": name != "affinities"}, "image")
    if np.issubdtype(base.dtype, np.integer) and (name in LABEL_ARRAYS or base.dtype.itemsize >= 4):
        return (data, {**spatial, "name": title, "opacity": 0.5, "visible": name != "fragments"}, "labels")
    meta = {**spatial, "name": title, "colormap": "gray"}
    if base.dtype == np.uint8:  # known range: napari need not scan a huge array for it
        meta["contrast_limits"] = (0.0, 255.0)
    elif base.dtype == np.uint16:
        meta["contrast_limits"] = (0.0, 65535.0)
    return (data, meta, "image")


def _lower_levels(container: Path, name: str) -> list:
    """Levels 1..L of the run's image ``name`` in ``container`` (OME layout,
    ``volumes.levels``); empty for a single-level image, an input container's array, a
    flat-layout run or anything psc cannot read as a group."""
    import zarr

    from psc.pipelines.em.volumes import levels

    try:
        node = open_node(container)
        if not isinstance(node, zarr.Group):
            return []
        return [node[key] for key in levels(node, name)[1:]]
    except Exception:  # a name that is no image (ValueError from layout), a foreign container
        return []


def em_run_layers(out: str | os.PathLike) -> list[LayerData]:
    """An EM run as psc-view shows it: its raw (from the run's settings, if still
    there), then the affinities, fragments and segmentation."""
    raw = run_raw(out)
    return ([em_layer(*raw)] if raw is not None else []) + read_zarr(out)


def run_raw(out: str | os.PathLike) -> tuple[Path, str] | None:
    """(container, array name) of the raw volume an EM run was made from, if it exists."""
    import zarr

    from psc.pipelines.em import layout
    from psc.pipelines.em.volumes import open_volume
    from psc.utils.errors import InputError

    try:
        settings = layout.RunSettings.load(out)
        if settings.raw_name:
            return Path(settings.raw), settings.raw_name
        raw = Path(settings.raw)
        if isinstance(open_node(raw), zarr.Array):  # RAW.zarr/raw
            return raw.parent, raw.name
        volume = open_volume(raw)  # a container: its only array, or "raw"
        return raw, str(volume.array.path).rsplit("/", 1)[-1]
    except (InputError, KeyError, OSError, TypeError, ValueError):
        return None
    except Exception:  # zarr's own errors, for a raw volume that moved or was deleted
        return None
