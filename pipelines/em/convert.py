"""Convert EM volumes (HDF5, TIFF stacks, numpy) into the pipeline's zarr v3 layout.

The EM pipeline reads only zarr v3 arrays with OME-Zarr metadata (see ``volumes``); the
data sets people have come as HDF5 files (CREMI, FIB-25), TIFF stacks or numpy dumps. A
source is given as ``PATH[:INNER]``:

- ``file.h5:/stack`` (also ``.hdf5``, ``.hdf``): the HDF5 data set ``/stack``; without
  it, the file's only data set. h5py reads the ``lzf`` filter natively.
- ``stack.tif`` (``.tiff``): a multi-page TIFF; ``folder/`` or ``"slices/*.tif"``: 2-D
  TIFF slices, sorted naturally by name (``z2`` before ``z10``) and stacked along z.
- ``volume.npy`` (memory-mapped), or ``arrays.npz:NAME`` (``NAME`` may be left out when
  the archive holds one array).

Two kinds of data, told apart by the source's dtype:

- *raw* (images): uint8, uint16 and floating point. The dtype is kept, except float64,
  which becomes float32 (what the networks read). Default array name ``raw``.
- *labels*: every other integer type (and bool). Stored as uint64, the dtype of the
  pipeline's fragments and segmentations, so labels compare without casts. Negative
  labels are refused. Default array name ``labels``.

The copy runs slab by slab along z (``chunks[0]`` planes at a time, chunk-aligned), so a
volume larger than memory converts with bounded memory, and it is atomic: the array is
written inside ``DST.zarr/.NAME.partial/`` and moved to ``DST.zarr/NAME`` only once
complete, so ``NAME`` is never a half-written array. Errors a user can fix raise
``InputError`` before anything is written, or remove what was written.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import zarr

from psc.utils.errors import InputError

from .blocks import blocks
from .volumes import OME_VERSION, Volume, create_volume, open_volume

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
TIFF_SUFFIXES = (".tif", ".tiff")
NUMPY_SUFFIXES = (".npy", ".npz")
SUFFIXES = HDF5_SUFFIXES + TIFF_SUFFIXES + NUMPY_SUFFIXES
RAW_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))
LABEL_DTYPE = np.dtype(np.uint64)
DEFAULT_CHUNKS = (64, 64, 64)
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


# --------------------------------------------------------------------------- sources


class _Source:
    """A 3-D view (z, y, x) of an opened source that reads z-slabs on demand.

    ``data`` is anything with ``shape``, ``dtype`` and numpy basic indexing (an h5py data
    set, a memory map, a page stack); ``read`` maps a z-slab to the source's own axes,
    which differ when singleton axes were squeezed away.
    """

    def __init__(self, data: Any, description: str):
        self.data = data
        self.description = description
        self.shape, self._lead, self._trail = _squeeze_to_3d(tuple(data.shape), description)
        self.dtype = np.dtype(data.dtype)

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Planes ``z0:z1`` as a (z, y, x) numpy array."""
        index = (0,) * self._lead + (slice(z0, z1), slice(None), slice(None)) + (0,) * self._trail
        return np.asarray(self.data[index])


def _squeeze_to_3d(shape: tuple[int, ...], description: str) -> tuple[tuple[int, ...], int, int]:
    """The (z, y, x) shape and how many leading/trailing singleton axes to drop.

    Singletons are the usual extra axes of exported volumes: a channel of 1 in front
    (c, z, y, x), a trailing sample axis (z, y, x, 1), ImageJ's t/c of 1. Leading ones
    are dropped first: (1, z, y, 1) becomes (z, y, 1). Anything else is ambiguous and
    refused rather than guessed.
    """
    if len(shape) < 3:
        raise InputError(f"{description}: expected a 3-D volume (z, y, x), got {len(shape)}-D data of shape {shape}")
    lead = trail = 0
    while len(shape) - lead - trail > 3 and shape[lead] == 1:
        lead += 1
    while len(shape) - lead - trail > 3 and shape[len(shape) - 1 - trail] == 1:
        trail += 1
    spatial = shape[lead:len(shape) - trail]
    if len(spatial) != 3:
        raise InputError(
            f"{description}: expected a 3-D volume (z, y, x), got shape {shape}; only "
            "singleton leading or trailing axes are dropped (split channels into separate files)"
        )
    if 0 in spatial:
        raise InputError(f"{description}: the volume is empty (shape {shape})")
    return spatial, lead, trail


def split_source(source: str) -> tuple[Path, str | None]:
    """``PATH[:INNER]`` -> (path, inner name or None).

    A path that exists is taken whole (it may contain ``:``); otherwise the split is made
    at the first ``:`` that follows a known file suffix, so ``a.h5:/g/x`` works.
    """
    if os.path.exists(source) or ":" not in source:
        return Path(source), None
    for match in re.finditer(":", source):
        head = source[: match.start()]
        if head.lower().endswith(SUFFIXES):
            return Path(head), source[match.end():] or None
    return Path(source), None


def _natural_key(path: Path) -> list:
    """Sort key for ``z2.tif`` before ``z10.tif``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", str(path))]


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def open_source(source: str, stack: ExitStack) -> _Source:
    """Open ``source`` (see the module doc) for slab reading; files close with ``stack``."""
    path, inner = split_source(source)
    if _is_glob(str(path)) and not path.exists():
        if inner:
            raise InputError(f"{source}: a glob of TIFF slices takes no :NAME")
        matches = [Path(p) for p in glob.glob(str(path)) if Path(p).suffix.lower() in TIFF_SUFFIXES]
        if len(matches) == 1 and matches[0].is_file():
            return _open_tiff_file(matches[0], stack)  # a glob naming one stack file
        return _open_tiff_slices(sorted(matches, key=_natural_key), str(path))
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        if inner:
            raise InputError(f"{source}: a folder of TIFF slices takes no :NAME")
        slices = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in TIFF_SUFFIXES]
        return _open_tiff_slices(sorted(slices, key=_natural_key), str(path))
    suffix = path.suffix.lower()
    if suffix in HDF5_SUFFIXES:
        return _open_hdf5(path, inner, stack)
    if suffix in TIFF_SUFFIXES:
        if inner:
            raise InputError(f"{source}: a TIFF file takes no :NAME")
        return _open_tiff_file(path, stack)
    if suffix == ".npy":
        if inner:
            raise InputError(f"{source}: a .npy file takes no :NAME (that is for .npz)")
        return _open_npy(path)
    if suffix == ".npz":
        return _open_npz(path, inner, stack)
    raise InputError(
        f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; expected HDF5 "
        f"({', '.join(HDF5_SUFFIXES)}), TIFF ({', '.join(TIFF_SUFFIXES)}), .npy or .npz"
    )


def _hdf5_datasets(file) -> list[str]:
    import h5py

    names: list[str] = []
    file.visititems(lambda name, node: names.append("/" + name) if isinstance(node, h5py.Dataset) else None)
    return names


def _open_hdf5(path: Path, inner: str | None, stack: ExitStack) -> _Source:
    import h5py

    try:
        file = stack.enter_context(h5py.File(path, "r"))
    except OSError as error:
        raise InputError(f"{path}: cannot read it as HDF5 ({error})") from None
    datasets = _hdf5_datasets(file)
    if inner is None:
        if len(datasets) != 1:
            raise InputError(
                f"{path}: holds {len(datasets)} data sets ({', '.join(datasets) or 'none'}); "
                f"name one as {path}:DATASET"
            )
        inner = datasets[0]
    node = file.get(inner)
    if not isinstance(node, h5py.Dataset):
        what = "a group, not a data set" if node is not None else "not found"
        raise InputError(f"{path}:{inner}: {what}; the file holds {', '.join(datasets) or 'no data sets'}")
    return _Source(node, f"{path}:{inner}")


class _PageStack:
    """The pages of a multi-page TIFF series as a lazily read (z, ...) array."""

    def __init__(self, tif, series):
        self.tif, self.series = tif, series
        self.shape, self.dtype = tuple(series.shape), np.dtype(series.dtype)

    def __getitem__(self, index: tuple) -> np.ndarray:
        first, rest = index[0], index[1:]
        pages = range(*first.indices(self.shape[0])) if isinstance(first, slice) else [first]
        data = self.tif.asarray(key=list(pages), series=self.series)
        data = data.reshape((len(pages), *self.shape[1:]))
        return data[(slice(None) if isinstance(first, slice) else 0, *rest)]


def _open_tiff_file(path: Path, stack: ExitStack) -> _Source:
    """A multi-page TIFF: page by page when a page is one z-plane (the common stack);
    otherwise (one page holding the whole volume, planar samples) all at once."""
    import tifffile

    try:
        tif = stack.enter_context(tifffile.TiffFile(path))
        series = tif.series[0]
    except (OSError, ValueError, IndexError, tifffile.TiffFileError) as error:
        raise InputError(f"{path}: cannot read it as TIFF ({error})") from None
    shape = tuple(series.shape)
    per_page = len(shape) >= 3 and len(series) == shape[0] and math.prod(shape[1:]) == math.prod(series.keyframe.shape)
    return _Source(_PageStack(tif, series) if per_page else series.asarray(), str(path))


class _SliceStack:
    """2-D TIFF files as a lazily read (z, y, x) array, one file per plane."""

    def __init__(self, paths: list[Path], shape: tuple[int, int], dtype: np.dtype):
        self.paths, self.dtype = paths, dtype
        self.shape = (len(paths), *shape)

    def __getitem__(self, index: tuple) -> np.ndarray:
        import tifffile

        first, rest = index[0], index[1:]
        picked = self.paths[first] if isinstance(first, slice) else [self.paths[first]]
        data = np.empty((len(picked), *self.shape[1:]), self.dtype)
        for plane, path in zip(data, picked):
            plane[...] = tifffile.imread(path).reshape(self.shape[1:])
        return data[(slice(None) if isinstance(first, slice) else 0, *rest)]


def _open_tiff_slices(paths: list[Path], description: str) -> _Source:
    """Check every slice's header (2-D, same shape and dtype) before any data is read,
    so a stray file is reported up front rather than half way through the copy."""
    import tifffile

    if not paths:
        raise InputError(f"{description}: no TIFF files ({', '.join(TIFF_SUFFIXES)}) found")
    headers = []
    for path in paths:
        try:
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                headers.append((tuple(s for s in series.shape if s != 1) or (1,), np.dtype(series.dtype)))
        except (OSError, ValueError, IndexError, tifffile.TiffFileError) as error:
            raise InputError(f"{path}: cannot read it as TIFF ({error})") from None
    shape, dtype = headers[0]
    for path, header in zip(paths, headers):
        if len(header[0]) != 2:
            raise InputError(f"{path}: a slice must be a 2-D image, got shape {header[0]}")
        if header != (shape, dtype):
            raise InputError(f"{path}: shape {header[0]} {header[1]} differs from {paths[0].name}'s {shape} {dtype}")
    return _Source(_SliceStack(paths, shape, dtype), description)


def _open_npy(path: Path) -> _Source:
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read it as .npy ({error})") from None
    return _Source(data, str(path))


def _open_npz(path: Path, inner: str | None, stack: ExitStack) -> _Source:
    """An .npz member is read whole when first sliced (zip members cannot be mapped)."""
    try:
        archive = stack.enter_context(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot read it as .npz ({error})") from None
    names = list(archive.files)
    if inner is None:
        if len(names) != 1:
            raise InputError(f"{path}: holds {len(names)} arrays ({', '.join(names) or 'none'}); name one as {path}:NAME")
        inner = names[0]
    if inner not in names:
        raise InputError(f"{path}:{inner}: not found; the archive holds {', '.join(names) or 'no arrays'}")
    try:
        data = archive[inner]
    except ValueError as error:
        raise InputError(f"{path}:{inner}: cannot read it ({error})") from None
    return _Source(data, f"{path}:{inner}")


# --------------------------------------------------------------------------- dtypes


def _native(dtype) -> np.dtype:
    """HDF5 and TIFF files may be big-endian; the rules (and zarr) see native types."""
    return np.dtype(dtype).newbyteorder("=")


def is_raw_dtype(dtype) -> bool:
    """Images are uint8, uint16 or floating point; every other integer type is labels."""
    dtype = _native(dtype)
    return dtype in RAW_DTYPES or dtype.kind == "f"


def target_dtype(dtype, description: str = "source") -> np.dtype:
    """The stored dtype: raw keeps its own (float64 -> float32), labels become uint64."""
    dtype = _native(dtype)
    if is_raw_dtype(dtype):
        return np.dtype(np.float32) if dtype == np.float64 else dtype
    if dtype.kind in "iub":
        return LABEL_DTYPE
    raise InputError(f"{description}: cannot convert data of type {dtype} (expected integers or floats)")


def default_name(dtype) -> str:
    return "raw" if is_raw_dtype(dtype) else "labels"


def _checked_cast(block: np.ndarray, dtype: np.dtype, description: str, z0: int) -> np.ndarray:
    """``block`` as ``dtype``, refusing what would not survive: NaN/inf images (they
    poison normalisation) and negative labels (they would wrap round in uint64)."""
    if dtype.kind == "f":
        block = block.astype(dtype, copy=False)
        if not np.isfinite(block).all():
            bad = int(np.argwhere(~np.isfinite(block))[0][0]) + z0
            raise InputError(f"{description}: NaN or infinite values (first in plane z={bad}); clean the data first")
        return block
    if block.dtype.kind == "i" and block.size and block.min() < 0:
        bad = int(np.argwhere(block < 0)[0][0]) + z0
        raise InputError(f"{description}: negative labels (first in plane z={bad}); labels must be >= 0")
    return block.astype(dtype, copy=False)


# --------------------------------------------------------------------------- arguments


def _triple(values: Sequence[float], what: str, positive: bool) -> tuple[float, float, float]:
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise InputError(f"{what} needs 3 values (z y x), got {len(values)}")
    if not all(math.isfinite(v) for v in values) or (positive and min(values) <= 0):
        raise InputError(f"{what} must be {'positive' if positive else 'finite'} numbers, got {values}")
    return values


def _chunks(chunks: Sequence[int], shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Chunks as asked, clipped to the shape (a chunk larger than the volume is waste)."""
    if len(chunks) != 3 or any(int(c) != c or c < 1 for c in chunks):
        raise InputError(f"chunks must be 3 positive integers (z y x), got {tuple(chunks)}")
    return tuple(min(int(c), s) for c, s in zip(chunks, shape))


def _check_name(name: str) -> str:
    """Array names are plain path components (no ``/``, not hidden or reserved)."""
    if not _NAME.fullmatch(name) or name.startswith("__"):
        raise InputError(f"array name {name!r}: use letters, digits, '_', '-' and '.', not starting with '.' or '__'")
    return name


# --------------------------------------------------------------------------- destination


def _check_destination(destination: Path, name: str, force: bool) -> bool:
    """Refuse what would fail or clobber before any data moves; True if it exists."""
    if destination.suffix != ".zarr":
        raise InputError(f"{destination}: the destination must be a .zarr folder")
    if not destination.exists():
        return False
    if destination.is_dir() and not any(destination.iterdir()):
        return True  # an empty folder made beforehand: used, and kept if the copy fails
    if not destination.is_dir() or not (destination / "zarr.json").is_file():
        raise InputError(f"{destination}: exists and is not a zarr v3 group")
    try:
        group = zarr.open_group(str(destination), mode="r")
    except Exception as error:  # zarr raises several kinds for a broken container
        raise InputError(f"{destination}: not a zarr group ({error})") from None
    if group.metadata.zarr_format != 3:
        raise InputError(f"{destination}: is a zarr v{group.metadata.zarr_format} group, not v3")
    if name in group and not force:
        raise InputError(f"{destination}/{name} exists: use --force to replace it, or --name")
    return True


def _partial_path(destination: Path, name: str) -> Path:
    return destination / f".{name}.partial"


def _commit(destination: Path, partial: Path, name: str) -> None:
    """Move the finished array into place, then record its OME entry in the container.

    A directory cannot be renamed over a non-empty one, so an old array is first moved
    aside into the partial folder (removed afterwards): ``NAME`` is briefly absent, but
    never half-written. The OME entry is the one ``create_volume`` wrote in the partial
    group; it names ``NAME`` relative to its group, so it is valid as it is.
    """
    entry = next(e for e in zarr.open_group(str(partial), mode="r").attrs["ome"]["multiscales"] if e["name"] == name)
    final, aside = destination / name, partial / ".replaced"
    if final.exists():
        os.replace(final, aside)
    try:
        os.replace(partial / name, final)
    except OSError:
        if aside.exists():  # put the old array back rather than lose it with the partial folder
            os.replace(aside, final)
        raise
    group = zarr.open_group(str(destination), mode="a")
    ome = dict(group.attrs.get("ome", {}))
    entries = [e for e in ome.get("multiscales", []) if e.get("name") != name] + [entry]
    group.attrs["ome"] = {**ome, "version": ome.get("version", OME_VERSION), "multiscales": entries}
    shutil.rmtree(partial)


# --------------------------------------------------------------------------- convert


def _progress(total: int, description: str, enabled: bool):
    """A tqdm bar on stderr; only on a terminal, so logs and captured output stay clean."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="plane", disable=None if enabled else True, leave=False)


@contextmanager
def _writing(destination: Path):
    """File-system failures while writing (permissions, full disk, a file in the way)
    are the user's to fix: report them as ``InputError`` naming the destination."""
    try:
        yield
    except OSError as error:
        raise InputError(f"{destination}: cannot write there ({error.strerror or error})") from None


def _read(data: _Source, z0: int, z1: int) -> np.ndarray:
    try:
        return data.read(z0, z1)
    except OSError as error:  # a truncated or corrupt file shows only when its data are read
        raise InputError(f"{data.description}: cannot read planes {z0}:{z1} ({error})") from None


def convert(
    source: str,
    destination: str | Path,
    voxel_size: Sequence[float],
    offset: Sequence[float] = (0.0, 0.0, 0.0),
    name: str | None = None,
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    force: bool = False,
    progress: bool = True,
    on_slab: Callable[[int, int], None] | None = None,
) -> Volume:
    """Copy ``source`` (``PATH[:INNER]``, see the module doc) into ``destination``/NAME.

    ``voxel_size`` and ``offset`` are nanometres (z y x); ``name`` defaults to ``raw`` or
    ``labels`` by dtype; ``chunks`` are clipped to the shape; ``force`` replaces an
    existing array of that name. ``on_slab(z_done, z_total)`` is called after each slab
    (progress reporting, and tests that interrupt a copy). Returns the new volume, opened
    read-only. Raises ``InputError`` for anything a user can fix; then ``NAME`` is left
    as it was and a destination created by this call is removed again.
    """
    voxel_size = _triple(voxel_size, "voxel size", positive=True)
    offset = _triple(offset, "offset", positive=False)
    destination = Path(destination)
    with ExitStack() as stack:
        data = open_source(str(source), stack)
        dtype = target_dtype(data.dtype, data.description)
        name = _check_name(name or default_name(data.dtype))
        chunks = _chunks(chunks, data.shape)
        existed = _check_destination(destination, name, force)
        partial = _partial_path(destination, name)
        try:
            volume = _create_partial(destination, partial, name, data.shape, dtype, chunks, voxel_size, offset)
            _fill(volume, data, dtype, destination, f"writing {name}", progress, on_slab)
            with _writing(destination):
                _commit(destination, partial, name)
        except BaseException:  # also Ctrl-C: never leave a partial array or an empty container
            shutil.rmtree(partial, ignore_errors=True)
            if not existed:
                shutil.rmtree(destination, ignore_errors=True)
            raise
    return open_volume(destination, name)


def _create_partial(destination: Path, partial: Path, name: str, shape, dtype, chunks, voxel_size, offset) -> Volume:
    """``partial``/NAME made by ``create_volume``, so its attributes and OME entry are
    the pipeline's own; a partial folder left by a killed run is discarded first."""
    with _writing(destination):
        zarr.open_group(str(destination), mode="a")
        shutil.rmtree(partial, ignore_errors=True)
        group = zarr.open_group(str(partial), mode="w")
        return create_volume(group, name, shape, dtype, chunks, voxel_size, offset, overwrite=True)


def _fill(volume: Volume, data: _Source, dtype: np.dtype, destination: Path, label: str, progress: bool,
          on_slab: Callable[[int, int], None] | None) -> None:
    """Copy chunk-aligned z-slabs, checking every value on the way (memory: one slab)."""
    depth = data.shape[0]
    with _progress(depth, label, progress) as bar:
        for (planes,) in blocks((depth,), (volume.array.chunks[0],)):
            z0, z1 = planes.start, planes.stop
            block = _checked_cast(_read(data, z0, z1), dtype, data.description, z0)
            with _writing(destination):
                volume.array[z0:z1] = block
            bar.update(z1 - z0)
            if on_slab:
                on_slab(z1, depth)
