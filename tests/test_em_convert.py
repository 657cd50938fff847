"""psc-convert: HDF5 / TIFF / numpy volumes into the EM pipeline's zarr v3 layout.

Round trips must be exact, geometry must land in both the array attributes and the OME
metadata, and every bad input must give one clear error line, a non-zero exit code and
no array (nor a half-written one) in the destination.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import zarr

from psc.app.convert import main
from psc.pipelines.em import volumes
from psc.pipelines.em.convert import convert, split_source
from psc.utils.errors import InputError

FIB25_GT = Path("/work/shared/data/fib25/train-gt.lzf.h5")


def volume(shape=(6, 20, 30), dtype=np.uint8, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        return rng.normal(size=shape).astype(dtype)
    if np.dtype(dtype).kind == "b":
        return rng.random(shape) > 0.5
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, 0), min(info.max, 10**6), size=shape, endpoint=True).astype(dtype)


def write_h5(path: Path, data: np.ndarray, dataset: str = "stack") -> Path:
    with h5py.File(path, "w") as file:
        file.create_dataset(dataset, data=data, compression="lzf", chunks=True)
    return path


def run_cli(capsys, *args) -> tuple[int, str, list[str]]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err.splitlines()


def assert_refused(code: int, err: list[str], destination: Path, name: str, *words: str) -> None:
    """Exit non-zero, exactly one error line naming the problem, no NAME (or partial) written."""
    assert code != 0
    assert len(err) == 1 and err[0].startswith("psc-convert: error:"), err
    for word in words:
        assert word in err[0], err[0]
    if destination.is_dir():
        assert not (destination / name).exists() and not (destination / f".{name}.partial").exists()
        assert name not in zarr.open_group(str(destination), mode="r")


def ome_dataset(destination: Path, name: str) -> dict:
    entries = zarr.open_group(str(destination), mode="r").attrs["ome"]["multiscales"]
    [entry] = [e for e in entries if e["name"] == name]
    [dataset] = entry["datasets"]
    return {t["type"]: t[t["type"]] for t in dataset["coordinateTransformations"]} | {"path": dataset["path"]}


# --------------------------------------------------------------------------- round trips


def test_hdf5_lzf_round_trip_with_geometry(tmp_path, capsys):
    data = volume((6, 20, 30), np.uint8)
    source = write_h5(tmp_path / "train-image.h5", data)
    destination = tmp_path / "out.zarr"
    code, out, err = run_cli(capsys, f"{source}:/stack", destination, "--voxel-size", 40, 4, 4,
                             "--offset", 400, 8, 12, "--chunks", 4, 16, 16)
    assert (code, err) == (0, [])
    assert "out.zarr/raw: 6x20x30 uint8" in out
    vol = volumes.open_volume(destination, "raw")
    np.testing.assert_array_equal(vol.array[...], data)
    assert vol.array.dtype == np.uint8 and vol.array.chunks == (4, 16, 16)
    assert vol.voxel_size == (40.0, 4.0, 4.0) and vol.offset == (400.0, 8.0, 12.0)
    attrs = vol.array.attrs.asdict()
    assert attrs["voxel_size"] == [40.0, 4.0, 4.0] and attrs["offset"] == [400.0, 8.0, 12.0]
    assert ome_dataset(destination, "raw") == {"scale": [40.0, 4.0, 4.0], "translation": [400.0, 8.0, 12.0],
                                               "path": "raw"}
    assert sorted(p.name for p in destination.iterdir()) == ["raw", "zarr.json"]  # no partial left


def test_hdf5_only_dataset_is_default_and_nested_paths_work(tmp_path, capsys):
    data = volume((5, 7, 9), np.uint16)
    source = write_h5(tmp_path / "a.hdf5", data, dataset="volumes/raw")
    assert run_cli(capsys, source, tmp_path / "a.zarr", "--voxel-size", 1, 1, 1)[0] == 0
    assert run_cli(capsys, f"{source}:volumes/raw", tmp_path / "b.zarr", "--voxel-size", 1, 1, 1)[0] == 0
    for name in ("a.zarr", "b.zarr"):
        np.testing.assert_array_equal(volumes.open_volume(tmp_path / name, "raw").array[...], data)


@pytest.mark.parametrize(
    "dtype, stored, name",
    [
        (np.uint8, np.uint8, "raw"),
        (np.uint16, np.uint16, "raw"),
        (np.float32, np.float32, "raw"),
        (np.float64, np.float32, "raw"),
        (np.int32, np.uint64, "labels"),
        (np.uint32, np.uint64, "labels"),
        (np.int64, np.uint64, "labels"),
        (np.uint64, np.uint64, "labels"),
        (np.int8, np.uint64, "labels"),
        (np.bool_, np.uint64, "labels"),
        (">u2", np.uint16, "raw"),  # big-endian, as some HDF5 and TIFF files are
        (">f8", np.float32, "raw"),
        (">i4", np.uint64, "labels"),
    ],
)
def test_dtype_rules(tmp_path, dtype, stored, name):
    data = volume((4, 6, 8), dtype)
    np.save(tmp_path / "v.npy", data)
    vol = convert(str(tmp_path / "v.npy"), tmp_path / "out.zarr", (8, 8, 8), progress=False)
    assert vol.array.path.endswith(name) and vol.array.dtype == stored
    np.testing.assert_array_equal(vol.array[...], data.astype(stored))


def test_multipage_tiff(tmp_path, capsys):
    data = volume((7, 9, 11), np.uint16)
    tifffile.imwrite(tmp_path / "stack.tif", data, compression="zlib")
    code, _, err = run_cli(capsys, tmp_path / "stack.tif", tmp_path / "out.zarr", "--voxel-size", 8, 8, 8,
                           "--chunks", 3, 64, 64)
    assert (code, err) == (0, [])
    vol = volumes.open_volume(tmp_path / "out.zarr", "raw")
    np.testing.assert_array_equal(vol.array[...], data)
    assert vol.array.chunks == (3, 9, 11)


def test_tiff_slices_folder_and_glob_in_natural_order(tmp_path, capsys):
    data = volume((12, 9, 11), np.uint8)
    folder = tmp_path / "slices"
    folder.mkdir()
    order = list(range(12))
    random.Random(0).shuffle(order)  # written out of order; names are z0 .. z11, unpadded
    for z in order:
        tifffile.imwrite(folder / f"z{z}.tif", data[z])
    (folder / "notes.txt").write_text("not a slice")
    assert run_cli(capsys, folder, tmp_path / "a.zarr", "--voxel-size", 8, 8, 8)[0] == 0
    assert run_cli(capsys, f"{folder}/*.tif", tmp_path / "b.zarr", "--voxel-size", 8, 8, 8)[0] == 0
    for name in ("a.zarr", "b.zarr"):
        np.testing.assert_array_equal(volumes.open_volume(tmp_path / name, "raw").array[...], data)


def test_npz_member_and_singleton_axes_squeezed(tmp_path):
    data = volume((5, 6, 7), np.uint32)
    np.savez(tmp_path / "two.npz", seg=data[None], other=data)  # (1, z, y, x): channel of one
    vol = convert(f"{tmp_path}/two.npz:seg", tmp_path / "out.zarr", (8, 8, 8), progress=False)
    np.testing.assert_array_equal(vol.array[...], data)
    np.save(tmp_path / "trailing.npy", data[..., None].astype(np.uint8))  # (z, y, x, 1)
    vol = convert(str(tmp_path / "trailing.npy"), tmp_path / "out.zarr", (8, 8, 8), name="image", progress=False)
    np.testing.assert_array_equal(vol.array[...], data.astype(np.uint8))
    assert sorted(zarr.open_group(str(tmp_path / "out.zarr"), mode="r").array_keys()) == ["image", "labels"]


def test_default_chunks_clipped_and_name_option(tmp_path, capsys):
    np.save(tmp_path / "v.npy", volume((5, 100, 30), np.uint8))
    assert run_cli(capsys, tmp_path / "v.npy", tmp_path / "o.zarr", "--voxel-size", 8, 8, 8, "--name", "em")[0] == 0
    vol = volumes.open_volume(tmp_path / "o.zarr", "em")
    assert vol.array.chunks == (5, 64, 30)
    assert ome_dataset(tmp_path / "o.zarr", "em")["path"] == "em"


def test_existing_array_refused_without_force_replaced_with_it(tmp_path, capsys):
    old, new = volume((4, 6, 8), np.uint8, seed=1), volume((6, 5, 4), np.uint8, seed=2)
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", new)
    destination = tmp_path / "out.zarr"
    assert run_cli(capsys, tmp_path / "old.npy", destination, "--voxel-size", 8, 8, 8)[0] == 0

    code, _, err = run_cli(capsys, tmp_path / "new.npy", destination, "--voxel-size", 4, 4, 4)
    assert code == 2 and len(err) == 1 and err[0].startswith("psc-convert: error:") and "--force" in err[0]
    np.testing.assert_array_equal(volumes.open_volume(destination, "raw").array[...], old)

    code, _, err = run_cli(capsys, tmp_path / "new.npy", destination, "--voxel-size", 4, 4, 4, "--force")
    assert (code, err) == (0, [])
    vol = volumes.open_volume(destination, "raw")
    np.testing.assert_array_equal(vol.array[...], new)
    assert vol.voxel_size == (4.0, 4.0, 4.0) and ome_dataset(destination, "raw")["scale"] == [4.0, 4.0, 4.0]
    assert len(zarr.open_group(str(destination), mode="r").attrs["ome"]["multiscales"]) == 1
    assert sorted(p.name for p in destination.iterdir()) == ["raw", "zarr.json"]


def test_interrupted_copy_keeps_the_old_array(tmp_path):
    """A copy that dies half way (Ctrl-C, a full disk) leaves NAME as it was, no partial."""
    old = volume((4, 6, 8), np.uint8, seed=1)
    np.save(tmp_path / "old.npy", old)
    np.save(tmp_path / "new.npy", volume((8, 6, 8), np.uint8, seed=2))
    destination = tmp_path / "out.zarr"
    convert(str(tmp_path / "old.npy"), destination, (8, 8, 8), progress=False)

    def interrupt(done, total):
        if done < total:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert(str(tmp_path / "new.npy"), destination, (8, 8, 8), chunks=(2, 6, 8), force=True,
                progress=False, on_slab=interrupt)
    np.testing.assert_array_equal(volumes.open_volume(destination, "raw").array[...], old)
    assert sorted(p.name for p in destination.iterdir()) == ["raw", "zarr.json"]


def test_split_source():
    assert split_source("a/train.h5:/stack") == (Path("a/train.h5"), "/stack")
    assert split_source("a/arrays.npz:seg") == (Path("a/arrays.npz"), "seg")
    assert split_source("a/stack.tif") == (Path("a/stack.tif"), None)
    assert split_source("a/odd:name.txt") == (Path("a/odd:name.txt"), None)


# --------------------------------------------------------------------------- bad inputs


def bad_source(kind: str, tmp_path: Path) -> tuple[str, tuple[str, ...]]:
    """A source (as typed on the command line) and words its error line must contain."""
    if kind == "missing file":
        return str(tmp_path / "nope.h5"), ("nope.h5", "no such file")
    if kind == "unknown extension":
        (tmp_path / "volume.raw").write_bytes(b"\0" * 64)
        return str(tmp_path / "volume.raw"), ("unknown file type", ".raw")
    if kind == "missing dataset":
        with h5py.File(tmp_path / "two.h5", "w") as file:
            file["raw"] = volume((3, 4, 5))
            file["labels/neuron_ids"] = volume((3, 4, 5), np.uint32)
        return f"{tmp_path}/two.h5:/stack", ("/stack", "/raw", "/labels/neuron_ids")
    if kind == "ambiguous dataset":
        with h5py.File(tmp_path / "two.h5", "w") as file:
            file["raw"], file["gt"] = volume((3, 4, 5)), volume((3, 4, 5))
        return str(tmp_path / "two.h5"), ("2 data sets", "/raw", "/gt")
    if kind == "not hdf5":
        (tmp_path / "fake.h5").write_text("hello")
        return str(tmp_path / "fake.h5"), ("HDF5",)
    if kind == "2-D":
        np.save(tmp_path / "plane.npy", volume((20, 30)))
        return str(tmp_path / "plane.npy"), ("3-D", "(20, 30)")
    if kind == "4-D":
        write_h5(tmp_path / "rgb.h5", volume((2, 4, 5, 6)))
        return f"{tmp_path}/rgb.h5:/stack", ("3-D", "(2, 4, 5, 6)")
    if kind == "NaN":
        data = volume((6, 4, 5), np.float32)
        data[5, 1, 2] = np.nan  # in the last slab: earlier slabs are written by then
        np.save(tmp_path / "nan.npy", data)
        return str(tmp_path / "nan.npy"), ("NaN", "z=5")
    if kind == "negative labels":
        data = volume((6, 4, 5), np.int32)
        data[4, 0, 0] = -1
        np.save(tmp_path / "neg.npy", data)
        return str(tmp_path / "neg.npy"), ("negative", "z=4")
    if kind == "mixed slices":
        folder = tmp_path / "slices"
        folder.mkdir()
        tifffile.imwrite(folder / "z0.tif", volume((4, 5)))
        tifffile.imwrite(folder / "z1.tif", volume((4, 6)))
        return str(folder), ("z1.tif", "differs")
    raise AssertionError(kind)


BAD_SOURCES = ["missing file", "unknown extension", "missing dataset", "ambiguous dataset", "not hdf5", "2-D",
               "4-D", "NaN", "negative labels", "mixed slices"]


@pytest.mark.parametrize("kind", BAD_SOURCES)
def test_bad_source_new_destination(tmp_path, capsys, kind):
    source, words = bad_source(kind, tmp_path)
    destination = tmp_path / "out.zarr"
    code, _, err = run_cli(capsys, source, destination, "--voxel-size", 8, 8, 8, "--chunks", 2, 64, 64)
    assert_refused(code, err, destination, "raw", *words)
    assert not destination.exists()  # a container this run would have created is not left behind


@pytest.mark.parametrize("kind", ["NaN", "negative labels", "2-D"])
def test_bad_source_existing_destination(tmp_path, capsys, kind):
    destination = tmp_path / "out.zarr"
    np.save(tmp_path / "keep.npy", volume((3, 4, 5)))
    convert(str(tmp_path / "keep.npy"), destination, (8, 8, 8), name="keep", progress=False)
    source, words = bad_source(kind, tmp_path)
    for name in ("raw", "labels"):
        code, _, err = run_cli(capsys, source, destination, "--voxel-size", 8, 8, 8, "--chunks", 2, 64, 64,
                               "--name", name)
        assert_refused(code, err, destination, name, *words)
    assert sorted(p.name for p in destination.iterdir()) == ["keep", "zarr.json"]


@pytest.mark.parametrize(
    "where, words",
    [
        ("under-a-file", ("cannot write",)),
        ("is-a-file", ("not a zarr",)),
        ("not-zarr-suffix", (".zarr",)),
    ],
)
def test_unwritable_destination(tmp_path, capsys, where, words):
    np.save(tmp_path / "v.npy", volume((3, 4, 5)))
    (tmp_path / "file").write_text("in the way")
    if where == "is-a-file":
        (tmp_path / "taken.zarr").write_text("in the way")
    destination = {"under-a-file": tmp_path / "file" / "out.zarr", "is-a-file": tmp_path / "taken.zarr",
                   "not-zarr-suffix": tmp_path / "out"}[where]
    code, _, err = run_cli(capsys, tmp_path / "v.npy", destination, "--voxel-size", 8, 8, 8)
    assert_refused(code, err, destination, "raw", *words)
    assert not (tmp_path / "out").exists() and (tmp_path / "file").read_text() == "in the way"


@pytest.mark.parametrize("option", [["--voxel-size", "0", "8", "8"], ["--name", "../x"], ["--chunks", "0", "8", "8"]])
def test_bad_options(tmp_path, capsys, option):
    np.save(tmp_path / "v.npy", volume((3, 4, 5)))
    args = ["--voxel-size", 8, 8, 8] + option if option[0] != "--voxel-size" else option
    code, _, err = run_cli(capsys, tmp_path / "v.npy", tmp_path / "out.zarr", *args)
    assert_refused(code, err, tmp_path / "out.zarr", "raw")
    assert not (tmp_path / "out.zarr").exists()


def test_library_raises_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        convert(str(tmp_path / "missing.npy"), tmp_path / "out.zarr", (8, 8, 8))


def test_installed_script(tmp_path):
    """The console script as a user runs it: one error line, no traceback; then success."""
    script = shutil.which("psc-convert") or str(Path(sys.executable).parent / "psc-convert")
    data = volume((3, 4, 5), np.int32)
    source = write_h5(tmp_path / "gt.h5", data)
    destination = tmp_path / "out.zarr"
    bad = subprocess.run([script, f"{source}:/missing", str(destination), "--voxel-size", "8", "8", "8"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.splitlines() == [bad.stderr.strip()] and bad.stderr.startswith("psc-convert: error:")
    assert "/stack" in bad.stderr and "Traceback" not in bad.stderr and not destination.exists()
    good = subprocess.run([script, f"{source}:/stack", str(destination), "--voxel-size", "8", "8", "8"],
                          capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    np.testing.assert_array_equal(volumes.open_volume(destination, "labels").array[...], data)


@pytest.mark.skipif(not FIB25_GT.exists(), reason=f"{FIB25_GT} not available")
def test_fib25_ground_truth(tmp_path, capsys):
    destination = tmp_path / "fib25.zarr"
    code, _, err = run_cli(capsys, f"{FIB25_GT}:/stack", destination, "--voxel-size", 8, 8, 8)
    assert (code, err) == (0, [])
    vol = volumes.open_volume(destination, "labels")
    assert vol.shape == (50, 100, 200) and vol.array.dtype == np.uint64
    with h5py.File(FIB25_GT, "r") as file:
        expected = file["stack"][...]
    np.testing.assert_array_equal(vol.array[...], expected.astype(np.uint64))
