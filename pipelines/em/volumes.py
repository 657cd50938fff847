"""Zarr v3 volumes with OME-Zarr metadata: the one storage layout of the EM pipeline.

Two kinds of container, each readable by other tools as it is:

- an input container (``psc-convert``'s ``RAW.zarr``, the napari writer's): every array
  (``raw``, ``labels``) directly under the group, so ``RAW.zarr/raw`` is the data, with
  an OME-Zarr 0.5 ``ome.multiscales`` entry per array on the group;
- a run's output (``OUT.zarr``): the OME-Zarr 0.5 image layout of ``layout``'s module
  doc (the affinities image at the root, its levels ``affinities/0, 1 ...``, the label
  images ``labels/fragments`` and ``labels/segmentation`` with ``image-label``
  metadata), so an OME-Zarr reader given ``OUT.zarr`` finds all three images.

Every array carries ``dimension_names`` (``c``? ``z y x``) and the attributes
``voxel_size`` and ``offset`` (nanometres, z y x; the funlib/daisy convention); the OME
``scale`` and ``translation`` transformations say the same for OME-Zarr readers.

A run's arrays are found by name (``layout.AFFINITIES`` ...) through :func:`locate`, the
one place that knows where a run keeps them (the OME layout, or the flat layout of runs
made before it); :func:`open_volume` and :func:`array_names` go through it.

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

from . import layout

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


def _axes(ndim: int) -> list[dict]:
    axes = [{"name": axis, "type": "space", "unit": UNIT} for axis in SPATIAL_AXES]
    return ([{"name": "c", "type": "channel"}] if ndim == 4 else []) + axes


def _dataset(path: str, ndim: int, voxel_size, offset) -> dict:
    scale, translation = list(map(float, voxel_size)), list(map(float, offset))
    if ndim == 4:  # the channel axis is not scaled nor moved
        scale, translation = [1.0] + scale, [0.0] + translation
    return {"path": path, "coordinateTransformations": [{"type": "scale", "scale": scale},
                                                        {"type": "translation", "translation": translation}]}


def _ome_entry(name: str, ndim: int, voxel_size, offset) -> dict:
    """The multiscales entry of a flat container's array ``name`` (one level, the array itself)."""
    return {"name": name, "axes": _axes(ndim), "datasets": [_dataset(name, ndim, voxel_size, offset)]}


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


def _array_at(group: zarr.Group, key: str) -> zarr.Array | None:
    """The array at ``key`` (a name or a path such as ``labels/fragments/0``) in
    ``group``; None if there is none, or a group is there."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            node = group[key]
        except KeyError:
            return None
    return node if isinstance(node, zarr.Array) else None


def _flat_arrays(group: zarr.Group) -> list[str]:
    with warnings.catch_warnings():  # graph.sqlite and .tracking/ sit beside the arrays
        warnings.simplefilter("ignore")
        return sorted(name for name, array in group.arrays() if array.ndim in (3, 4))


def is_flat_run(group: zarr.Group) -> bool:
    """Whether ``group`` holds a run's arrays in the layout of runs made before the
    OME-Zarr image layout: ``affinities``, ``fragments`` or ``segmentation`` as arrays
    directly in the root. Such a run is read, and resumed, as it is."""
    return any(_array_at(group, name) is not None for name in layout.IMAGE_GROUPS)


def locate(group: zarr.Group, name: str, level: int = 0) -> str:
    """The key in ``group`` of the array that ``name`` means, at resolution ``level``:
    the one mapping from a name to an array that every psc reader of a run goes through
    (``open_volume``, so the stages, psc-eval, psc-view and the napari plugin).

    A run's image (``layout.AFFINITIES``, ``FRAGMENTS``, ``SEGMENTATION``, or what a
    newly declared stage creates) is its level array in the OME-Zarr layout
    (``layout.level_path``: ``labels/fragments/0``), or, in a run made before that
    layout, the array of that name at the root (level 0 only). Otherwise a name is an
    array in ``group`` (``raw`` of an input container; a path such as
    ``labels/fragments/0`` also works). Raises ``InputError`` naming what is there."""
    if name and "/" not in name and name != layout.LABELS_GROUP:
        key = layout.level_path(name, level)
        if _array_at(group, key) is not None:
            return key
    if level == 0 and _array_at(group, name) is not None:
        return name
    what = f"{name!r} at level {level}" if level else repr(name)
    raise InputError(f"{group.store_path}: no array named {what} (has {array_names(group)})")


def array_names(group: zarr.Group) -> list[str]:
    """The volumes (3-D, or 4-D with channels first) of ``group``, sorted: the arrays
    directly in it, and the images (by name: ``fragments``, not ``labels/fragments/0``)
    that it holds in the OME-Zarr layout: a run's, and any group with a level ``0``."""
    names = set(_flat_arrays(group))
    with warnings.catch_warnings():  # graph.sqlite and .tracking/ sit beside the groups
        warnings.simplefilter("ignore")
        candidates = set(layout.IMAGE_GROUPS) | {key for key, _ in group.groups() if key != layout.LABELS_GROUP}
    names.update(name for name in candidates if _array_at(group, layout.level_path(name)) is not None)
    return sorted(names)


def container_arrays(path: str | Path) -> list[str]:
    """``array_names`` of the container at ``path``; empty for anything else (an array,
    no zarr, unreadable)."""
    try:
        node = open_node(path)
    except Exception:  # zarr raises several kinds for a path that is not zarr
        return []
    return array_names(node) if isinstance(node, zarr.Group) else []


def split_run_path(path: str | Path) -> tuple[Path, str] | None:
    """``OUT.zarr/segmentation`` as (``OUT.zarr``, ``segmentation``) when no such folder
    exists but OUT.zarr holds that image in the OME-Zarr layout: the path by which a run's
    arrays were named before that layout (psc-eval, psc-view and napari take it)."""
    path = Path(path)
    if path.exists() or path.name in ("", layout.LABELS_GROUP) or not is_zarr_path(path.parent):
        return None
    try:
        node = open_node(path.parent)
    except Exception:
        return None
    if isinstance(node, zarr.Group) and _array_at(node, layout.level_path(path.name)) is not None:
        return path.parent, path.name
    return None


def is_volume_path(path: str | Path) -> bool:
    """A zarr array of 3 or 4 dimensions, a container holding such arrays directly or a
    run's images (psc's layouts; other multiscale pyramids are left to OME-Zarr readers),
    or a run's image by name (``OUT.zarr/segmentation``, :func:`split_run_path`)."""
    if split_run_path(path) is not None:
        return True
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


def _create_array(group: zarr.Group, key: str, shape, dtype, chunks, voxel_size, offset, channels: int,
                  overwrite: bool) -> Volume:
    """The array ``key`` of ``group`` with psc's attributes, created, or reopened when it
    exists with this shape and dtype (what makes a run resumable: a second run writes
    into the arrays of the first); another shape or dtype is refused, never overwritten
    silently."""
    shape = tuple(int(s) for s in shape)
    chunks = tuple(int(c) for c in chunks)
    if channels:
        shape, chunks = (channels, *shape), (channels, *chunks)
    existing = _array_at(group, key)
    if existing is not None and not overwrite:
        if tuple(existing.shape) != shape or np.dtype(existing.dtype) != np.dtype(dtype):
            raise InputError(
                f"{key} exists with shape {tuple(existing.shape)} {existing.dtype}, "
                f"not {shape} {np.dtype(dtype)}: use a new output or --force"
            )
        return _wrap(existing, group, key)
    names = (["c"] if channels else []) + list(SPATIAL_AXES)
    array = group.create_array(
        key,
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
    return Volume(array, tuple(map(float, voxel_size)), tuple(map(float, offset)))


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
    """Create (or, unless ``overwrite``, reopen if it matches) the array ``name`` directly
    in the container, with an ``ome.multiscales`` entry for it on the container: the
    layout of input containers (``RAW.zarr/raw``); a run's images are made by
    :func:`create_run_volume`."""
    group = container if isinstance(container, zarr.Group) else open_container(container)
    volume = _create_array(group, name, shape, dtype, chunks, voxel_size, offset, channels, overwrite)
    ome = dict(group.attrs.get("ome", {}))
    entries = [entry for entry in ome.get("multiscales", []) if entry.get("name") != name]
    entries.append(_ome_entry(name, volume.array.ndim, voxel_size, offset))
    if entries != ome.get("multiscales"):
        group.attrs["ome"] = {"version": OME_VERSION, "multiscales": entries}
    return volume


# --- a run's images in the OME-Zarr 0.5 layout (layout.py's module doc) -----------------

# image-label colours: only the background is known in advance (segment ids are arbitrary);
# readers that follow "colors" show it transparent, as psc's own reader does
LABEL_COLOURS = [{"label-value": 0, "rgba": [0, 0, 0, 0]}]


def levels(group: zarr.Group, name: str) -> list[str]:
    """The resolution levels of the run's image ``name`` in ``group`` (OME layout): the
    keys ``<image>/0``, ``<image>/1`` ... that exist, from 0 up to the first gap."""
    found = []
    while _array_at(group, layout.level_path(name, len(found))) is not None:
        found.append(layout.level_path(name, len(found)))
    return found


def _multiscale(group: zarr.Group, name: str, prefix: str = "") -> dict:
    """The ``multiscales`` entry of image ``name`` from its level arrays' own geometry
    (``voxel_size``, ``offset``), dataset paths relative to the group that holds the
    entry (``prefix`` + level)."""
    datasets = []
    ndim = None
    for key in levels(group, name):
        array = group[key]
        ndim = array.ndim
        attrs = array.attrs.asdict()
        datasets.append(_dataset(prefix + key.rsplit("/", 1)[1], array.ndim, attrs["voxel_size"],
                                 attrs.get("offset", (0.0, 0.0, 0.0))))
    return {"name": name, "axes": _axes(ndim or 3), "datasets": datasets}


def _set_ome(node: zarr.Group, **entries) -> None:
    """Merge ``entries`` into ``node``'s ``ome`` attribute (written only if it changes:
    a resume rewrites nothing)."""
    ome = dict(node.attrs.get("ome", {}))
    wanted = {**ome, "version": OME_VERSION, **entries}
    if wanted != ome:
        node.attrs["ome"] = wanted


def write_image_metadata(group: zarr.Group, name: str) -> None:
    """(Re)write the OME-Zarr metadata of the run's image ``name`` from the levels it
    has: its group's ``multiscales`` (and ``image-label`` for a label image, listed in
    ``labels/``'s ``labels``); for ``layout.ROOT_IMAGE``, the root's ``multiscales`` too,
    with the same datasets under ``affinities/``. A stage that adds levels calls this
    once they exist; every image of a run SHOULD have as many levels as the root image
    (OME-Zarr 0.5: a label image has the same number of scale levels as its image)."""
    image = group[layout.image_group(name)]
    entries: dict = {"multiscales": [_multiscale(group, name)]}
    if name in layout.LABEL_IMAGES:
        entries["image-label"] = {"colors": LABEL_COLOURS, "source": {"image": "../../"}}
        labels = group[layout.LABELS_GROUP]
        listed = list(labels.attrs.get("ome", {}).get("labels", []))
        _set_ome(labels, labels=listed + [name] if name not in listed else listed)
    _set_ome(image, **entries)
    if name == layout.ROOT_IMAGE:
        _set_ome(group, multiscales=[_multiscale(group, name, prefix=layout.image_group(name) + "/")])


def create_run_volume(
    group: zarr.Group,
    name: str,
    shape: Sequence[int],
    dtype,
    chunks: Sequence[int],
    voxel_size: Sequence[float],
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    channels: int = 0,
    level: int = 0,
) -> Volume:
    """Create (or reopen, for a resume) level ``level`` of the run's image ``name`` in
    the run's root ``group`` and (re)write the image's OME-Zarr metadata. A run made in
    the flat layout (:func:`is_flat_run`) is resumed in it: its arrays are reopened where
    they are (level 0 only), so an old run never ends half in one layout, half in the other."""
    if is_flat_run(group):
        if level:
            raise InputError(f"{group.store_path}: a run in the flat layout of older psc has only level 0 "
                             f"of {name}: start over with --force to get the OME-Zarr layout")
        return create_volume(group, name, shape, dtype, chunks, voxel_size, offset, channels)
    path = layout.image_group(name)
    for depth in range(1, path.count("/") + 2):  # labels, then labels/fragments: explicit groups
        parent = "/".join(path.split("/")[:depth])
        if _array_at(group, parent) is None and parent not in group:
            group.create_group(parent)
    volume = _create_array(group, layout.level_path(name, level), shape, dtype, chunks, voxel_size, offset,
                           channels, overwrite=False)
    write_image_metadata(group, name)
    return volume


def run_array_path(out: str | Path, name: str, level: int = 0) -> Path:
    """Where on disk the run in ``out`` keeps ``name`` at ``level`` (:func:`locate`):
    ``OUT.zarr/labels/segmentation/0``, or ``OUT.zarr/segmentation`` in the flat layout."""
    return Path(out) / locate(open_container(out, mode="r"), name, level)


def remove_run_volumes(out: str | Path, names: Sequence[str]) -> None:
    """Remove the run's images ``names`` from ``out`` in either layout, and their OME
    metadata (the root's multiscales entries, ``labels/``'s list; ``labels/`` itself
    once nothing else is in it); anything else in the container stays (``--force``)."""
    import shutil

    out = Path(out)
    for name in names:
        for path in (out / name, out / layout.image_group(name)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    labels = out / layout.LABELS_GROUP
    if labels.is_dir() and {entry.name for entry in labels.iterdir()} <= {"zarr.json"}:
        shutil.rmtree(labels)  # nothing but the run's label images was in it (read or not)
    group = zarr.open_group(str(out), mode="a")
    if labels.is_dir():  # someone else's label images stay listed
        node = group[layout.LABELS_GROUP]
        ome = dict(node.attrs.get("ome", {}))
        if "labels" in ome:
            node.attrs["ome"] = {**ome, "labels": [label for label in ome["labels"] if label not in names]}
    ome = dict(group.attrs.get("ome", {}))
    if "multiscales" in ome:
        kept = [entry for entry in ome["multiscales"] if entry.get("name") not in names]
        if kept:
            ome["multiscales"] = kept
        else:  # an empty multiscales list is no image: leave none
            ome.pop("multiscales")
        if set(ome) <= {"version"}:
            group.attrs.pop("ome", None)
        else:
            group.attrs["ome"] = ome


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
    path: str | Path | zarr.Group, name: str | None = None, mode: str = "r", level: int = 0
) -> Volume:
    """Open a volume given as a container and a name, ``container.zarr/name``, or a bare
    array. Without a name, a container holding one array, or one called ``raw``, will do.

    The name goes through :func:`locate`: a run's images by name (``layout.FRAGMENTS``)
    in either of its layouts, ``level`` choosing the resolution level; and
    ``OUT.zarr/segmentation`` names the image of an OME-layout run (:func:`split_run_path`)."""
    if isinstance(path, zarr.Group):
        group = path
    else:
        split = split_run_path(path) if name is None else None
        if split is not None:
            return open_volume(open_container(split[0], mode="r" if mode == "r" else "r+"), split[1], mode, level)
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
    if name is None:
        with warnings.catch_warnings():  # the run's graph.sqlite lives beside the arrays
            warnings.filterwarnings("ignore", message=".*not recognized as a component", category=UserWarning)
            arrays = sorted(key for key, _ in group.arrays())
        if len(arrays) == 1:
            name = arrays[0]
        elif "raw" in arrays:
            name = "raw"
        else:
            raise InputError(
                f"{group.store_path}: holds {array_names(group) or arrays or 'no arrays'}; "
                "name one as CONTAINER.zarr/NAME"
            )
    key = locate(group, name, level)
    return _wrap(group[key], group, key)


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
