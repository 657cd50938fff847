"""Zarr v3 volumes with OME-Zarr metadata: the one storage layout of the EM pipeline.

Every array (raw, affinities, fragments, segmentation, labels) is a plain zarr v3 array
directly under its container group, so ``zarr.open("out.zarr")["segmentation"]`` is the
data. Two kinds of metadata travel with it, so that other tools read it as it is:

- on the array: ``dimension_names`` (``c``? ``z y x``) and the attributes ``voxel_size``
  and ``offset`` (nanometres, z y x; the funlib/daisy convention), and
- on the container group: an OME-Zarr 0.5 ``ome.multiscales`` entry per array (one level,
  ``scale`` and ``translation`` transformations), which napari's and neuroglancer's
  OME-Zarr readers understand.

Regions are handled in voxel units (``funlib.geometry.Roi`` of voxel indices); the world
offset only matters when the data are shown beside other data.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import zarr
from funlib.geometry import Roi

from psc.utils.errors import InputError

SPATIAL_AXES = ("z", "y", "x")
UNIT = "nanometer"
OME_VERSION = "0.5"


@dataclass
class Volume:
    """A zarr array with its geometry; ``channels`` is 0 for a scalar volume."""

    array: zarr.Array
    voxel_size: tuple[float, ...]
    offset: tuple[float, ...]

    @property
    def channels(self) -> int:
        return self.array.shape[0] if self.array.ndim == 4 else 0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[-3:])

    @property
    def roi(self) -> Roi:
        """The whole volume as a voxel ROI starting at 0."""
        return Roi((0, 0, 0), self.shape)

    def read(self, roi: Roi) -> np.ndarray:
        """The voxels of ``roi`` (which must lie inside the volume)."""
        return self.array[(Ellipsis, *roi.to_slices())]

    def write(self, roi: Roi, data: np.ndarray) -> None:
        self.array[(Ellipsis, *roi.to_slices())] = data


def _ome_entry(name: str, ndim: int, voxel_size, offset) -> dict:
    axes = [{"name": axis, "type": "space", "unit": UNIT} for axis in SPATIAL_AXES]
    scale, translation = list(map(float, voxel_size)), list(map(float, offset))
    if ndim == 4:
        axes = [{"name": "c", "type": "channel"}] + axes
        scale, translation = [1.0] + scale, [0.0] + translation
    return {
        "name": name,
        "axes": axes,
        "datasets": [
            {
                "path": name,
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": translation},
                ],
            }
        ],
    }


# --- what a path is (the one zarr detection psc-segment, psc-eval, psc-view and the
# napari plugin use) ---------------------------------------------------------------------

ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")  # v3 node; v2 group; v2 array


def is_zarr_path(path: str | Path) -> bool:
    """A zarr container or array on disk: a folder with ``zarr.json`` (v3) or
    ``.zgroup``/``.zarray`` (v2)."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in ZARR_MARKERS)


def names_zarr(path: str | Path) -> bool:
    """A path psc takes for zarr: one on disk, or one named so (``raw.zarr``,
    ``raw.zarr/raw``), whether or not it exists yet (an error about it then says why)."""
    return any(part.endswith(".zarr") for part in Path(path).parts) or is_zarr_path(path)


def open_node(path: str | Path) -> zarr.Group | zarr.Array:
    """The zarr group or array at ``path``, read-only (zarr's warnings about the files a
    run keeps beside its arrays silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return zarr.open(str(path), mode="r")


def array_names(group: zarr.Group) -> list[str]:
    """The volumes (3-D, or 4-D with channels first) directly in ``group``, sorted."""
    with warnings.catch_warnings():  # graph.sqlite and .tracking/ sit beside the arrays
        warnings.simplefilter("ignore")
        return sorted(name for name, array in group.arrays() if array.ndim in (3, 4))


def container_arrays(path: str | Path) -> list[str]:
    """``array_names`` of the container at ``path``; empty for anything else (an array,
    no zarr, unreadable)."""
    try:
        node = open_node(path)
    except Exception:  # zarr raises several kinds for a path that is not zarr
        return []
    return array_names(node) if isinstance(node, zarr.Group) else []


def is_volume_path(path: str | Path) -> bool:
    """A zarr array of 3 or 4 dimensions, or a container holding such arrays directly
    (psc's layout; multiscale pyramids in subgroups are left to OME-Zarr readers)."""
    if not is_zarr_path(path):
        return False
    try:
        node = open_node(path)
    except Exception:
        return False
    if isinstance(node, zarr.Array):
        return node.ndim in (3, 4)
    return bool(array_names(node))


def open_container(path: str | Path, mode: str = "a") -> zarr.Group:
    """The zarr group at ``path`` (created for modes ``a`` and ``w``)."""
    try:
        return zarr.open_group(str(path), mode=mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError) as error:
        raise InputError(f"{path}: not a zarr container ({error})") from None


def create_volume(
    container: str | Path | zarr.Group,
    name: str,
    shape: Sequence[int],
    dtype,
    chunks: Sequence[int],
    voxel_size: Sequence[float],
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    channels: int = 0,
    overwrite: bool = False,
) -> Volume:
    """Create (or, unless ``overwrite``, reopen if it matches) the array ``name``.

    Reopening is what makes the pipeline resumable: a second run writes into the arrays of
    the first. A mismatch in shape or dtype is refused rather than silently overwritten.
    """
    group = container if isinstance(container, zarr.Group) else open_container(container)
    shape = tuple(int(s) for s in shape)
    chunks = tuple(int(c) for c in chunks)
    if channels:
        shape, chunks = (channels, *shape), (channels, *chunks)
    if name in group and not overwrite:
        array = group[name]
        if tuple(array.shape) != shape or np.dtype(array.dtype) != np.dtype(dtype):
            raise InputError(
                f"{name} exists with shape {tuple(array.shape)} {array.dtype}, "
                f"not {shape} {np.dtype(dtype)}: use a new output or --force"
            )
        return open_volume(group, name)
    names = (["c"] if channels else []) + list(SPATIAL_AXES)
    array = group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=0,
        dimension_names=names,
        attributes={
            "voxel_size": [float(v) for v in voxel_size],
            "offset": [float(o) for o in offset],
            "axis_names": names,
            "units": ["nm"] * 3,
        },
        overwrite=True,
    )
    ome = dict(group.attrs.get("ome", {}))
    entries = [entry for entry in ome.get("multiscales", []) if entry.get("name") != name]
    entries.append(_ome_entry(name, len(shape), voxel_size, offset))
    group.attrs["ome"] = {"version": OME_VERSION, "multiscales": entries}
    return Volume(array, tuple(map(float, voxel_size)), tuple(map(float, offset)))


def _geometry_from_ome(group: zarr.Group, name: str) -> tuple[tuple, tuple] | None:
    for entry in group.attrs.get("ome", {}).get("multiscales", []):
        for dataset in entry.get("datasets", []):
            if dataset.get("path") != name:
                continue
            scale, translation = None, None
            for transform in dataset.get("coordinateTransformations", []):
                if transform.get("type") == "scale":
                    scale = transform["scale"][-3:]
                if transform.get("type") == "translation":
                    translation = transform["translation"][-3:]
            if scale is not None:
                return tuple(scale), tuple(translation or (0.0, 0.0, 0.0))
    return None


def _wrap(array: zarr.Array, group: zarr.Group | None, name: str | None) -> Volume:
    if array.ndim not in (3, 4):
        raise InputError(f"{name or 'array'}: expected a 3-D volume (z, y, x), got shape {array.shape}")
    attrs = array.attrs.asdict()
    if "voxel_size" in attrs:
        voxel_size = tuple(float(v) for v in attrs["voxel_size"])
        offset = tuple(float(o) for o in attrs.get("offset", (0, 0, 0)))
    else:
        found = _geometry_from_ome(group, name) if group is not None and name else None
        voxel_size, offset = found if found else ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    return Volume(array, voxel_size, offset)


def open_volume(
    path: str | Path | zarr.Group, name: str | None = None, mode: str = "r"
) -> Volume:
    """Open a volume given as a container and a name, ``container.zarr/name``, or a bare
    array. Without a name, a container holding one array, or one called ``raw``, will do."""
    if isinstance(path, zarr.Group):
        group = path
    else:
        if not Path(path).exists():
            raise InputError(f"{path}: no such file or directory")
        try:
            node = zarr.open(str(path), mode=mode)
        except Exception as error:  # zarr raises several kinds for a non-zarr path
            raise InputError(f"{path}: not a zarr array or group ({error})") from None
        if isinstance(node, zarr.Array):
            if name:
                raise InputError(f"{path} is an array, it has no member {name!r}")
            parent = Path(path).parent
            try:
                group = zarr.open_group(str(parent), mode="r")
            except Exception:
                group = None
            return _wrap(node, group, Path(path).name)
        group = node
    with warnings.catch_warnings():  # the run's graph.sqlite lives beside the arrays
        warnings.filterwarnings("ignore", message=".*not recognized as a component", category=UserWarning)
        arrays = sorted(key for key, _ in group.arrays())
    if name is None:
        if len(arrays) == 1:
            name = arrays[0]
        elif "raw" in arrays:
            name = "raw"
        else:
            raise InputError(
                f"{group.store_path}: holds {arrays or 'no arrays'}; name one as CONTAINER.zarr/NAME"
            )
    if name not in arrays:
        raise InputError(f"{group.store_path}: no array named {name!r} (has {arrays})")
    return _wrap(group[name], group, name)


def read_clamped(volume: Volume, roi: Roi) -> np.ndarray:
    """The voxels of ``roi``, which may reach outside the volume: outside voxels mirror
    the inside ones (reflection about the border voxel, numpy's ``reflect``).

    The mirror is taken about the *volume's* border, never a block's, so every block of a
    blockwise run sees exactly what a whole-volume run sees.
    """
    index = []
    for begin, end, size in zip(roi.begin, roi.end, volume.shape):
        coords = np.arange(begin, end)
        if size == 1:
            coords = np.zeros_like(coords)
        else:
            period = 2 * (size - 1)
            coords = np.abs(np.mod(coords, period))
            coords = np.where(coords >= size, period - coords, coords)
        index.append(coords)
    lo = [int(c.min()) for c in index]
    hi = [int(c.max()) + 1 for c in index]
    inside = volume.read(Roi(lo, [h - l for h, l in zip(hi, lo)]))
    channel = (slice(None),) if volume.channels else ()
    return inside[channel + np.ix_(*[c - l for c, l in zip(index, lo)])]


FINGERPRINT_CHUNKS = 8  # chunks whose content is hashed (evenly spaced in the chunk grid)


def sampled_chunks(array: zarr.Array, samples: int) -> list[tuple[int, tuple[slice, ...]]]:
    """``samples`` chunks of ``array`` chosen deterministically, evenly spaced over the
    chunk grid in C order (first and last included): ``(linear index, region)`` pairs.
    What the fingerprint hashes and the intensity check (``intensity.py``) reads."""
    shape, chunks = tuple(int(s) for s in array.shape), tuple(int(c) for c in array.chunks)
    grid = tuple(-(-s // c) for s, c in zip(shape, chunks))
    total = int(np.prod(grid))
    picked = sorted({int(round(i)) for i in np.linspace(0, total - 1, min(samples, total))}) if total else []
    regions = []
    for linear in picked:
        index = np.unravel_index(linear, grid)
        regions.append((linear, tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, shape))))
    return regions


def fingerprint(volume: Volume, samples: int = FINGERPRINT_CHUNKS) -> dict:
    """What identifies a raw volume beyond its path: shape, dtype, chunking, and the
    sha256 of ``samples`` chunks chosen deterministically (evenly spaced over the chunk
    grid in C order, first and last included). A re-conversion to the same path that
    changes the content changes the hash unless it leaves every sampled chunk as it was."""
    import hashlib

    array = volume.array
    shape, chunks = tuple(int(s) for s in array.shape), tuple(int(c) for c in array.chunks)
    picked = sampled_chunks(array, samples)
    digest = hashlib.sha256()
    for linear, region in picked:
        try:
            data = np.ascontiguousarray(array[region])
        except Exception as error:  # a corrupt chunk: predict reports its blocks, as without a fingerprint
            digest.update(f"{linear}:unreadable:{type(error).__name__}".encode())
            continue
        digest.update(f"{linear}:{data.shape}".encode())
        digest.update(data.tobytes())
    return {"shape": list(shape), "dtype": str(np.dtype(array.dtype)), "chunks": list(chunks),
            "sampled_chunks": len(picked), "sha256": digest.hexdigest()}
