"""The downsampling stage (issue 16): resolution levels 1..L of every image of a run.

The array functions against explicit loop references (odd sizes, ties), then a small
synthetic run: its levels' shapes, dtypes, values (the blockwise result equals the whole
array downsampled in memory), OME-Zarr metadata, what ome-zarr-py sees, and a run with 2
workers equal to a serial one.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from psc.pipelines.em.downsample import (downsample_mean, downsample_mode, level_count, level_shape,
                                         pyramid)


def _cell_slices(shape):
    for index in itertools.product(*(range(-(-s // 2)) for s in shape)):
        yield index, tuple(slice(2 * i, min(2 * i + 2, s)) for i, s in zip(index, shape))


def _mean_loop(data: np.ndarray) -> np.ndarray:
    spatial = data.shape[-3:]
    out = np.zeros(data.shape[:-3] + level_shape(spatial), data.dtype)
    for channel in itertools.product(*(range(c) for c in data.shape[:-3])):
        for index, cell in _cell_slices(spatial):
            values = data[channel + cell].astype(np.float64).ravel()
            out[channel + index] = int(np.floor(values.mean() + 0.5))  # halves up
    return out


def _mode_loop(labels: np.ndarray) -> np.ndarray:
    out = np.zeros(level_shape(labels.shape), labels.dtype)
    for index, cell in _cell_slices(labels.shape):
        counts = Counter(int(v) for v in labels[cell].ravel())
        top = max(counts.values())
        tied = sorted(v for v, c in counts.items() if c == top)
        nonzero = [v for v in tied if v != 0]
        out[index] = nonzero[0] if nonzero else 0
    return out


@pytest.mark.parametrize("shape", [(4, 6, 8), (5, 7, 3), (1, 2, 3), (3, 3, 3)])
def test_mean_equals_the_loop_reference_per_channel_odd_sizes_included(shape):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(3, *shape), dtype=np.uint8)
    down = downsample_mean(data)
    assert down.dtype == np.uint8 and down.shape == (3, *level_shape(shape))
    np.testing.assert_array_equal(down, _mean_loop(data))
    np.testing.assert_array_equal(downsample_mean(data[1]), _mean_loop(data[1]))  # no channel axis


def test_mean_rounds_halves_up_and_never_overflows_uint8():
    cell = np.array([255] * 8, np.uint8).reshape(2, 2, 2)
    assert downsample_mean(cell).item() == 255
    half = np.array([0, 1] * 4, np.uint8).reshape(2, 2, 2)  # mean 0.5
    assert downsample_mean(half).item() == 1
    partial = np.array([[[3]], [[4]]], np.uint8)  # a partial cell (1x1 in y, x): the mean of 3, 4
    assert downsample_mean(partial).item() == 4


@pytest.mark.parametrize("shape", [(6, 4, 8), (5, 7, 3), (1, 1, 1), (3, 2, 5)])
def test_mode_equals_the_loop_reference_odd_sizes_included(shape):
    rng = np.random.default_rng(1)
    for high in (2, 4, 9):  # few ids: many ties, zeros among them
        labels = rng.integers(0, high, size=shape).astype(np.uint64) * np.uint64(2**40)
        down = downsample_mode(labels)
        assert down.dtype == np.uint64 and down.shape == level_shape(shape)
        np.testing.assert_array_equal(down, _mode_loop(labels))


def test_mode_tie_rule():
    def cell(values):
        return downsample_mode(np.array(values, np.uint64).reshape(2, 2, 2)).item()

    assert cell([5, 5, 5, 3, 3, 0, 0, 0]) == 5  # 5 and 0 tied at 3: the nonzero one
    assert cell([7, 7, 7, 7, 2, 2, 2, 2]) == 2  # tied: the smallest
    assert cell([0, 0, 0, 0, 9, 9, 9, 9]) == 9  # tied with 0: not background
    assert cell([0, 0, 0, 0, 0, 9, 9, 9]) == 0  # 0 wins outright
    assert cell([0] * 8) == 0
    assert cell([4, 1, 6, 8, 3, 2, 5, 7]) == 1  # all different: the smallest


def test_pyramid_and_level_count():
    labels = np.arange(5 * 6 * 7, dtype=np.uint64).reshape(5, 6, 7)
    levels = pyramid(labels, 3, labels=True)
    assert [level.shape for level in levels] == [(5, 6, 7), (3, 3, 4), (2, 2, 2), (1, 1, 1)]
    assert level_count((128, 128, 128), (1000, 1000, 1000)) == 3  # chunks 64, 32, 16
    assert level_count((64, 64, 48), (1000, 1000, 1000)) == 1  # 48 / 4 = 12 < 16
    assert level_count((16, 24, 20), (40, 56, 48)) == 0
    assert level_count((132, 128, 128), (1000,) * 3) == 2  # 132 / 8 is not an integer
    assert level_count((128, 128, 128), (3, 1000, 1000)) == 2  # 3 -> 2 -> 1: nothing left to halve
    assert level_count((32, 32, 32), (40, 56, 48), min_chunk=8) == 2


# --- the stage, in a small synthetic run ----------------------------------------------------

import shutil  # noqa: E402

import zarr  # noqa: E402

from psc.pipelines.em import downsample as em_downsample  # noqa: E402
from psc.pipelines.em import layout  # noqa: E402
from psc.pipelines.em.run import prepare, run  # noqa: E402
from psc.pipelines.em.stages import stage_named, stages_not_done  # noqa: E402
from psc.pipelines.em.volumes import levels, open_volume  # noqa: E402

from em_fixtures import synthetic_raw, tiny_weights  # noqa: E402

SHAPE = (37, 45, 42)  # odd sizes: partial blocks and partial cells at the far ends
BLOCK = (32, 32, 32)
LEVELS = 2  # with 8-voxel chunks allowed (the default 16 would leave 1 level at 32^3 blocks)
NAMES = (layout.AFFINITIES, layout.FRAGMENTS, layout.SEGMENTATION)
VOXEL, OFFSET = (8.0, 8.0, 8.0), (80.0, 0.0, 16.0)  # em_fixtures.synthetic_raw's
pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")


@pytest.fixture(scope="module")
def em(tmp_path_factory):
    """A finished serial run (all stages: relabel and downsample chained) with levels 1, 2."""
    folder = tmp_path_factory.mktemp("em_downsample")
    raw, _, _ = synthetic_raw(folder, shape=SHAPE)
    weights = tiny_weights(folder)
    out = folder / "out.zarr"
    with pytest.MonkeyPatch.context() as patch:  # prepare fixes the levels; workers write what exists
        patch.setattr(em_downsample, "MIN_CHUNK", 8)
        prepare(str(raw / "raw"), out, weights, block_size=BLOCK, thresholds=(0.01, 0.5), threshold=0.01)
    result = run(out, workers=0, progress=False)
    assert [report.failed for report in result["stages"]] == [0] * len(result["stages"])
    return folder, out


def _levels(out) -> dict[str, list[np.ndarray]]:
    group = zarr.open_group(str(out), mode="r")
    return {name: [group[key][...] for key in levels(group, name)] for name in NAMES}


def test_levels_have_the_shapes_dtypes_and_values_of_the_whole_array_downsampled(em):
    _, out = em
    settings = layout.RunSettings.load(out)
    assert stage_named("downsample").is_done(str(out), settings)
    found = _levels(out)
    for name, arrays in found.items():
        labels = name in layout.LABEL_IMAGES
        assert len(arrays) == LEVELS + 1, name
        expected = pyramid(arrays[0], LEVELS, labels=labels)
        for level, (array, reference) in enumerate(zip(arrays, expected)):
            assert array.shape[-3:] == level_shape(SHAPE, level) and array.dtype == arrays[0].dtype
            np.testing.assert_array_equal(array, reference, err_msg=f"{name} level {level}")
        volume = open_volume(out, name, level=2)
        assert volume.array.chunks[-3:] == (8, 8, 8)
        assert volume.voxel_size == (32.0, 32.0, 32.0)
        assert volume.offset == tuple(o + 1.5 * v for o, v in zip(OFFSET, VOXEL))  # cell centres
    assert found[layout.AFFINITIES][1].shape == (3, 19, 23, 21)
    assert len(np.unique(found[layout.SEGMENTATION][2])) > 1 and 0 not in found[layout.FRAGMENTS][1]


def test_multiscales_metadata_lists_every_level_with_doubled_scale_and_centred_translation(em):
    _, out = em
    root = zarr.open_group(str(out), mode="r")
    for name in NAMES:
        (entry,) = root[layout.image_group(name)].attrs["ome"]["multiscales"]
        assert [d["path"] for d in entry["datasets"]] == ["0", "1", "2"]
        channel = [1.0] if name == layout.AFFINITIES else []
        for level, dataset in enumerate(entry["datasets"]):
            scale, translation = dataset["coordinateTransformations"]
            assert scale["scale"] == channel + [v * 2 ** level for v in VOXEL]
            assert translation["translation"] == [0.0] * len(channel) + [
                o + (2 ** level - 1) * v / 2 for o, v in zip(OFFSET, VOXEL)]
    (entry,) = root.attrs["ome"]["multiscales"]
    assert [d["path"] for d in entry["datasets"]] == ["affinities/0", "affinities/1", "affinities/2"]


def test_ome_zarr_py_sees_the_levels_of_all_three_images(em):
    reader = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    _, out = em
    ours = _levels(out)
    nodes = list(reader.Reader(parse_url(str(out)))())
    images = {node.metadata.get("name"): node for node in nodes if node.data}
    assert set(images) == set(NAMES)
    for name, node in images.items():
        assert len(node.data) == LEVELS + 1, name
        for level, data in enumerate(node.data):
            np.testing.assert_array_equal(np.asarray(data), ours[name][level], err_msg=f"{name} {level}")


def test_models_validate_the_pyramid(em):
    models = pytest.importorskip("ome_zarr_models.v05")
    _, out = em
    root = zarr.open_group(str(out), mode="r")
    image = models.Image.from_zarr(root)
    assert len(image.attributes.ome.multiscales[0].datasets) == LEVELS + 1
    models.Labels.from_zarr(root[layout.LABELS_GROUP])


def test_stage_downsample_alone_with_2_workers_equals_the_serial_run(em):
    folder, out = em
    copy = folder / "two_workers.zarr"
    shutil.copytree(out, copy)
    group = zarr.open_group(str(copy), mode="r+")
    for name in NAMES:  # forget the levels: zeros and no done markers
        for key in levels(group, name)[1:]:
            group[key][...] = 0
    shutil.rmtree(layout.tracking_path(copy, "downsample"))
    settings = layout.RunSettings.load(copy)
    assert not stage_named("downsample").is_done(str(copy), settings)
    assert stages_not_done(copy, ("downsample",), settings) == []  # relabel is done: it may run alone
    run(copy, workers=2, progress=False, stages=("downsample",))
    ours, theirs = _levels(out), _levels(copy)
    for name in NAMES:
        for level in range(LEVELS + 1):
            np.testing.assert_array_equal(theirs[name][level], ours[name][level], err_msg=f"{name} {level}")


def test_a_new_threshold_drops_the_downsample_markers_with_relabels():
    stage = stage_named("downsample")
    assert "threshold" in stage.invalidating() and stage.chains_after == "relabel"


def test_psc_napari_reader_opens_each_image_as_a_multiscale_layer(em):
    import dask.array as da

    from psc.plugins.napari._reader import read_zarr

    _, out = em
    ours = _levels(out)
    layers = {(meta["name"] if isinstance(meta["name"], str) else meta["name"][0]): (data, meta, kind)
              for data, meta, kind in read_zarr(out)}
    assert sorted(kind for _, _, kind in layers.values()) == ["image", "labels", "labels"]
    for data, meta, kind in layers.values():
        name = meta["metadata"]["psc"]["array"]
        assert isinstance(data, list) and all(isinstance(level, da.Array) for level in data)
        assert meta["multiscale"] is True and meta["metadata"]["psc"]["levels"] == LEVELS + 1
        assert list(meta["scale"]) == list(VOXEL)  # level 0's; napari scales the others by their shapes
        for level, array in enumerate(data):
            np.testing.assert_array_equal(np.asarray(array), ours[name][level])
