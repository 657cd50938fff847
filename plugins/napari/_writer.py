"""Writer: a Labels layer back to NIfTI (on its source scan's grid) or to zarr (psc's
EM layout, so psc-eval and the reader take it as it is).

NIfTI: the affine is the source scan's (``metadata["psc"]["affine"]``, set by the
reader and the Segment widget), else one built from the layer's ``scale`` and
``translate``; the tissue names go to a ``.tsv`` beside it, as psc-segment writes them.
zarr: one array, named after the layer, in a container at ``path``, with
``voxel_size`` = ``scale`` and ``offset`` = ``translate`` and OME-Zarr metadata; a
lazy (dask) layer is written a slab at a time, never loaded whole.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

SLAB = 64  # z slices written at a time to zarr


def smallest_dtype(data) -> np.dtype:
    """The smallest unsigned integer type holding the labels (signed if any is negative)."""
    import dask.array as da

    low, high = (da.compute(data.min(), data.max()) if isinstance(data, da.Array)
                 else (np.min(data), np.max(data)))
    low, high = int(low), int(high)
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64) if low >= 0 else (np.int16, np.int32, np.int64):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return np.dtype(dtype)
    return np.dtype(np.int64)


def affine_of(meta: dict, ndim: int) -> np.ndarray:
    psc = (meta.get("metadata") or {}).get("psc") or {}
    if "affine" in psc:
        return np.asarray(psc["affine"], dtype=np.float64)
    affine = np.eye(4)
    scale = list(meta.get("scale") or [1.0] * ndim)[-3:]
    translate = list(meta.get("translate") or [0.0] * ndim)[-3:]
    affine[:3, :3] = np.diag(scale)
    affine[:3, 3] = translate
    return affine


def _names(meta: dict) -> dict[int, str]:
    features = meta.get("features")
    if features is None or len(features) == 0 or "name" not in features:
        return {}
    index = features["index"] if "index" in features else range(len(features["name"]))
    return {int(i): str(n) for i, n in zip(index, features["name"])}


def write_nifti_labels(path: str, data: Any, meta: dict) -> list[str]:
    """The labels on their scan's grid, and their names as psc-segment writes them (the
    same writers: ``psc.pipelines.mri.io.write_nifti``, ``outputs.write_label_table``)."""
    from psc.pipelines.mri.io import write_nifti
    from psc.pipelines.mri.outputs import label_table_path, write_label_table

    array = np.asarray(data)
    if array.ndim != 3:
        raise ValueError(f"NIfTI labels must be 3-D, this layer is {array.ndim}-D")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(array, affine_of(meta, array.ndim), out, dtype=smallest_dtype(array))
    written = [str(out)]
    names = _names(meta)
    if names:
        sidecar = label_table_path(out)
        write_label_table(names, sidecar)
        written.append(str(sidecar))
    return written


def array_name(meta: dict) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(meta.get("name") or "labels")).strip("_.")
    return name or "labels"


def write_zarr_labels(path: str, data: Any, meta: dict) -> list[str]:
    from psc.pipelines.em.blocks import slabs
    from psc.pipelines.em.volumes import create_volume

    ndim = len(data.shape)
    if ndim != 3:
        raise ValueError(f"zarr labels must be 3-D (z, y, x), this layer is {ndim}-D")
    shape = tuple(int(s) for s in data.shape)
    dtype = np.dtype(data.dtype) if np.dtype(data.dtype).kind in "ui" else smallest_dtype(data)
    chunks = tuple(min(64, s) for s in shape)
    scale = tuple(float(s) for s in (meta.get("scale") if meta.get("scale") is not None else (1.0,) * 3))
    translate = tuple(float(t) for t in (meta.get("translate") if meta.get("translate") is not None else (0.0,) * 3))
    volume = create_volume(path, array_name(meta), shape, dtype, chunks, scale, translate, overwrite=True)
    for slab in slabs(shape, default=SLAB):
        volume.array[slab] = np.asarray(data[slab], dtype=dtype)
    return [str(path)]


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """The npe2 single-layer writer command for Labels. A multiscale layer (a run's
    downsample levels) is saved at full resolution, its level 0: the levels are what the
    downsample stage makes from it, not edits of their own."""
    if isinstance(data, (list, tuple)):
        data = data[0]
    lower = str(path).lower().rstrip("/")
    if lower.endswith(".zarr"):
        return write_zarr_labels(str(path).rstrip("/"), data, meta)
    if lower.endswith((".nii", ".nii.gz")):
        return write_nifti_labels(path, data, meta)
    raise ValueError(f"{path}: psc writes labels as .nii.gz, .nii or .zarr")
