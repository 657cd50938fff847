"""OUT.zarr in the OME-Zarr 0.5 image layout (issue 16): what other tools read from a run.

Standard OME-Zarr readers take the first ``multiscales`` entry of the group they are
given and follow its ``labels`` group; a run used to keep three single-array entries on
its root, so ome-zarr-py saw the affinities and nothing else, and the segmentation was
not a label image. These tests run psc-segment (in-process) on a synthetic volume and
read OUT.zarr with ome-zarr-py's reader (and napari-ome-zarr's, when installed), then
check that psc itself still reads, scores and resumes a run in the older flat layout.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from psc.app.segment import main as segment_main
from psc.pipelines.em import layout
from psc.pipelines.em.evaluate import evaluate_run
from psc.pipelines.em.graph import GraphStore, apply_lookup
from psc.pipelines.em.volumes import array_names, locate, open_volume, run_array_path

from em_fixtures import synthetic_raw, tiny_weights

SHAPE = (40, 56, 48)
BLOCK = ("16", "24", "20")
VOXEL, OFFSET = [8.0, 8.0, 8.0], [80.0, 0.0, 16.0]  # em_fixtures.synthetic_raw's
NAMES = (layout.AFFINITIES, layout.FRAGMENTS, layout.SEGMENTATION)
LOW = "0.01"  # a threshold at which the untrained model's segmentation has many segments
# zarr names the run's files beside its arrays (graph.sqlite, .tracking) when a test lists the root
pytestmark = pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")


def _segment(raw, out, weights, *extra) -> list[str]:
    return [str(raw), "-o", str(out), "--weights", str(weights), "--workers", "0", "--device", "cpu",
            "--block-size", *BLOCK, "--thresholds", LOW, "0.5", "--threshold", LOW, *extra]


@pytest.fixture(scope="module")
def em(tmp_path_factory):
    """A finished run in today's layout, with its inputs."""
    folder = tmp_path_factory.mktemp("em_ome")
    raw, _, labels = synthetic_raw(folder, shape=SHAPE)
    weights = tiny_weights(folder)
    out = folder / "out.zarr"
    assert segment_main(_segment(raw / "raw", out, weights)) == 0
    return folder, raw, weights, out


def _psc_arrays(out) -> dict[str, np.ndarray]:
    return {name: open_volume(out, name).array[:] for name in NAMES}


# --- the layout, as written --------------------------------------------------------------

def test_each_image_is_a_group_with_its_levels_and_the_labels_are_label_images(em):
    _, _, _, out = em
    root = zarr.open_group(str(out), mode="r")
    assert "psc" in root.attrs and layout.RunSettings.load(out).block_size == (16, 24, 20)
    for name in NAMES:
        assert locate(root, name) == layout.level_path(name, 0) == f"{layout.image_group(name)}/0"
        assert run_array_path(out, name) == out / layout.image_group(name) / "0"
        image = root[layout.image_group(name)].attrs["ome"]
        assert image["version"] == "0.5"
        (entry,) = image["multiscales"]
        assert entry["name"] == name and [d["path"] for d in entry["datasets"]] == ["0"]
        transforms = entry["datasets"][0]["coordinateTransformations"]
        channel = [1.0] if name == layout.AFFINITIES else []
        assert transforms == [{"type": "scale", "scale": channel + VOXEL},
                              {"type": "translation", "translation": [0.0] * len(channel) + OFFSET}]
        assert [a["name"] for a in entry["axes"]] == ["c"] * len(channel) + ["z", "y", "x"]
        assert root[layout.level_path(name)].metadata.dimension_names == tuple(a["name"] for a in entry["axes"])
    # the root is the affinities image (readers start there) and holds no array itself
    (entry,) = root.attrs["ome"]["multiscales"]
    assert entry["name"] == layout.AFFINITIES and [d["path"] for d in entry["datasets"]] == ["affinities/0"]
    assert not list(root.array_keys())
    labels = root[layout.LABELS_GROUP].attrs["ome"]
    assert labels == {"version": "0.5", "labels": [layout.FRAGMENTS, layout.SEGMENTATION]}
    for name in layout.LABEL_IMAGES:
        label = root[layout.image_group(name)].attrs["ome"]["image-label"]
        assert label["source"] == {"image": "../../"} and {"label-value": 0, "rgba": [0, 0, 0, 0]} in label["colors"]
    assert array_names(root) == sorted(NAMES)


# --- what other readers see ----------------------------------------------------------------

def test_ome_zarr_py_finds_the_affinities_image_and_two_label_images(em):
    reader = pytest.importorskip("ome_zarr.reader")
    from ome_zarr.io import parse_url

    _, _, _, out = em
    ours = _psc_arrays(out)
    nodes = list(reader.Reader(parse_url(str(out)))())
    images = {node.metadata.get("name"): node for node in nodes if node.data}
    assert set(images) == set(NAMES)
    assert images[layout.AFFINITIES].load(reader.Label) is None
    for name in layout.LABEL_IMAGES:
        assert images[name].load(reader.Label) is not None, f"{name} is not a label image"
    for name, node in images.items():
        assert len(node.data) == 1  # one resolution level so far
        data = np.asarray(node.data[0])
        assert data.shape == ours[name].shape and data.dtype == ours[name].dtype
        np.testing.assert_array_equal(data, ours[name], err_msg=name)
        scale, translation = node.metadata["coordinateTransformations"][0]
        assert scale["scale"][-3:] == VOXEL and translation["translation"][-3:] == OFFSET
    assert ours[layout.AFFINITIES].shape == (3, *SHAPE) and ours[layout.SEGMENTATION].shape == SHAPE
    assert 0 not in ours[layout.FRAGMENTS] and len(np.unique(ours[layout.SEGMENTATION])) > 1


def test_the_layout_validates_against_the_ome_zarr_0_5_models(em):
    """ome-zarr-models (what ome-zarr-py 0.18 installs) checks the spec's MUSTs: the
    datasets exist with matching dimensions, labels are integer, listed and multiscale."""
    models = pytest.importorskip("ome_zarr_models.v05")
    _, _, _, out = em
    root = zarr.open_group(str(out), mode="r")
    image = models.Image.from_zarr(root)
    assert image.attributes.ome.multiscales[0].datasets[0].path == "affinities/0"
    labels = models.Labels.from_zarr(root[layout.LABELS_GROUP])
    assert labels.label_paths == [layout.FRAGMENTS, layout.SEGMENTATION]


def test_napari_ome_zarr_opens_the_affinities_and_both_labels(em):
    plugin = pytest.importorskip("napari_ome_zarr._reader")
    _, _, _, out = em
    read = plugin.napari_get_reader(str(out))
    assert read is not None
    layers = read(str(out))
    kinds = sorted(kind for _, _, kind in layers)
    assert kinds == ["image", "labels", "labels"]
    shapes = {kind: [] for kind in kinds}
    for data, meta, kind in layers:
        shapes[kind].append(tuple((data[0] if isinstance(data, list) else data).shape))
        assert list(meta["scale"])[-3:] == VOXEL
    assert shapes == {"image": [(3, *SHAPE)], "labels": [SHAPE, SHAPE]}


def test_psc_reads_a_run_image_by_its_old_path(em):
    """``OUT.zarr/segmentation`` (what psc-eval and psc-view were given) still names it."""
    from psc.plugins.napari._reader import read_zarr

    _, raw, _, out = em
    segmentation = open_volume(out / layout.SEGMENTATION)
    np.testing.assert_array_equal(segmentation.array[:], open_volume(out, layout.SEGMENTATION).array[:])
    assert segmentation.voxel_size == tuple(VOXEL) and segmentation.offset == tuple(OFFSET)
    ((data, meta, kind),) = read_zarr(out / layout.SEGMENTATION)
    assert kind == "labels" and meta["metadata"]["psc"]["array"] == layout.SEGMENTATION
    names = [meta["name"] for _, meta, _ in read_zarr(out)]
    assert names == [["affinities z", "affinities y", "affinities x"], "fragments", "segmentation"]
    ((_, meta, kind),) = read_zarr(out / layout.level_path(layout.FRAGMENTS))  # the level array itself
    assert kind == "labels" and meta["name"] == "fragments"


# --- runs in the flat layout of older psc ------------------------------------------------

def to_flat_layout(out: Path) -> None:
    """Rewrite a run as psc wrote runs before the OME-Zarr image layout: the three
    arrays directly in the root, and one single-array multiscales entry each on the root."""
    root = zarr.open_group(str(out), mode="r")
    entries = []
    for name in NAMES:
        ndim = root[layout.level_path(name)].ndim
        axes = [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"]
        scale, translation = list(VOXEL), list(OFFSET)
        if ndim == 4:
            axes, scale, translation = [{"name": "c", "type": "channel"}] + axes, [1.0] + scale, [0.0] + translation
        entries.append({"name": name, "axes": axes, "datasets": [{"path": name, "coordinateTransformations": [
            {"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}]}]})
    for name in NAMES:
        os.replace(out / layout.level_path(name), out / f".{name}.moving")
    shutil.rmtree(out / layout.AFFINITIES)
    shutil.rmtree(out / layout.LABELS_GROUP)
    for name in NAMES:
        os.replace(out / f".{name}.moving", out / name)
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["ome"] = {"version": "0.5", "multiscales": entries}
    (out / "zarr.json").write_text(json.dumps(meta))


@pytest.fixture()
def flat(em, tmp_path):
    _, _, _, out = em
    old = tmp_path / "old.zarr"
    shutil.copytree(out, old)
    to_flat_layout(old)
    assert set(zarr.open_group(str(old), mode="r").array_keys()) == set(NAMES)
    return old


def test_psc_reads_and_scores_a_flat_layout_run(em, flat):
    from psc.plugins.napari._reader import read_zarr

    folder, raw, _, out = em
    root = zarr.open_group(str(flat), mode="r")
    for name in NAMES:
        assert locate(root, name) == name and run_array_path(flat, name) == flat / name
    new, old = _psc_arrays(out), _psc_arrays(flat)
    for name in NAMES:
        np.testing.assert_array_equal(old[name], new[name], err_msg=name)
        assert open_volume(flat, name).voxel_size == tuple(VOXEL)
    assert evaluate_run(str(flat), str(raw / "labels"), progress=False) == \
        evaluate_run(str(out), str(raw / "labels"), progress=False)
    assert [meta["metadata"]["psc"]["array"] for _, meta, _ in read_zarr(flat)] == list(NAMES)
    with pytest.raises(Exception, match="level 1"):
        locate(root, layout.SEGMENTATION, level=1)


def test_a_flat_layout_run_resumes_in_its_layout(em, flat, capsys):
    """A resume writes into the old arrays where they are: relabel's markers dropped and
    the segmentation emptied, the same command writes it again, and no OME group appears."""
    _, raw, weights, out = em
    shutil.rmtree(layout.tracking_path(flat, "relabel"))
    zarr.open_array(str(flat / layout.SEGMENTATION), mode="r+")[:] = 0
    assert segment_main(_segment(raw / "raw", flat, weights)) == 0
    assert "resuming" in capsys.readouterr().out
    assert not (flat / layout.LABELS_GROUP).exists() and not (flat / layout.AFFINITIES / "0").exists()
    np.testing.assert_array_equal(zarr.open_array(str(flat / layout.SEGMENTATION), mode="r")[:],
                                  open_volume(out, layout.SEGMENTATION).array[:])
    store = GraphStore(layout.graph_path(flat))
    try:
        ids, segments = store.lookup(float(LOW))
    finally:
        store.close()
    np.testing.assert_array_equal(open_volume(flat, layout.SEGMENTATION).array[:],
                                  apply_lookup(open_volume(flat, layout.FRAGMENTS).array[:], ids, segments))


def test_force_on_a_flat_layout_run_gives_the_ome_layout(em, flat):
    _, raw, weights, out = em
    assert segment_main(_segment(raw / "raw", flat, weights, "--force")) == 0
    root = zarr.open_group(str(flat), mode="r")
    assert not list(root.array_keys())  # the flat arrays and their root entries are gone
    assert [e["name"] for e in root.attrs["ome"]["multiscales"]] == [layout.AFFINITIES]
    for name in NAMES:
        assert locate(root, name) == layout.level_path(name)
    np.testing.assert_array_equal(open_volume(flat, layout.SEGMENTATION).array[:],
                                  open_volume(out, layout.SEGMENTATION).array[:])
