"""The napari plugin without a GUI: manifest and discovery, readers (scale, translate,
layer types, names, channel axes, laziness), the Labels writer, scoring, the sample
data and psc-view's --dry-run."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("dask")

import dask.array as da  # noqa: E402

from psc.pipelines.em.graph import GraphStore, apply_lookup  # noqa: E402
from psc.pipelines.em.metrics import evaluate  # noqa: E402
from psc.pipelines.mri.metrics import dice_per_class  # noqa: E402
from psc.plugins.napari import _reader as reader  # noqa: E402
from psc.plugins.napari import _scoring as scoring  # noqa: E402
from psc.plugins.napari._writer import write_labels  # noqa: E402

MANIFEST = Path(reader.__file__).with_name("napari.yaml")


def by_name(layers):
    out = {}
    for data, meta, kind in layers:
        names = meta["name"] if isinstance(meta["name"], list) else [meta["name"]]
        for name in names:
            out[name] = (data, meta, kind)
    return out


# --- manifest -------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # npe2's own pydantic v1-style fields
def test_manifest_is_valid_and_the_installed_plugin_is_discovered():
    npe2 = pytest.importorskip("npe2")

    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "psc"
    contributions = manifest.contributions
    patterns = contributions.readers[0].filename_patterns
    assert {"*.nii", "*.nii.gz", "*.mgz", "*.zarr"} <= set(patterns)
    assert {".nii.gz", ".zarr"} <= set(contributions.writers[0].filename_extensions)
    assert {w.display_name for w in contributions.widgets} == {"Segment", "Score", "Threshold (EM)"}
    assert {s.key for s in contributions.sample_data} == {"t1_brain", "em_cube"}
    for command in contributions.commands:  # every python_name resolves
        module, _, attribute = command.python_name.partition(":")
        assert callable(getattr(__import__(module, fromlist=[attribute]), attribute)), command.id

    manager = npe2.PluginManager()
    manager.discover()
    assert "psc" in manager._manifests, "pip install -e . registers the napari.manifest entry point"
    assert any(r.plugin_name == "psc" for r in manager.iter_compatible_readers(["x_dseg.nii.gz"]))


# --- MRI readers ----------------------------------------------------------------------

def test_mri_scan_and_outputs_are_read_with_their_geometry(mri_outputs):
    zooms = np.sqrt((mri_outputs.affine[:3, :3] ** 2).sum(0))
    assert reader.napari_get_reader(str(mri_outputs.scan)) is not None
    assert reader.napari_get_reader(str(mri_outputs.folder / "missing.nii.gz")) is None
    assert reader.napari_get_reader(str(mri_outputs.dseg_tsv)) is None

    (image, meta, kind), = reader.napari_get_reader(str(mri_outputs.scan))(str(mri_outputs.scan))
    assert kind == "image" and meta["name"] == "sub"
    np.testing.assert_allclose(meta["scale"], zooms)
    np.testing.assert_allclose(meta["translate"], mri_outputs.affine[:3, 3])
    np.testing.assert_array_equal(image, mri_outputs.image)
    np.testing.assert_allclose(meta["metadata"]["psc"]["affine"], mri_outputs.affine, atol=1e-5)

    (labels, lmeta, lkind), = reader.read(str(mri_outputs.dseg))
    assert lkind == "labels" and lmeta["name"] == "sub_dseg"
    np.testing.assert_array_equal(labels, mri_outputs.truth)
    np.testing.assert_allclose(lmeta["scale"], zooms)
    assert dict(zip(lmeta["features"]["index"], lmeta["features"]["name"])) == {
        0: "background", 1: "CSF", 2: "GM", 3: "WM"}
    assert lmeta["colormap"][3] != lmeta["colormap"][2]

    (probs, pmeta, pkind), = reader.read(str(mri_outputs.probseg))
    assert pkind == "image" and pmeta["channel_axis"] == 3 and probs.shape == (*mri_outputs.image.shape, 4)
    assert pmeta["name"] == ["sub_probseg background", "sub_probseg CSF", "sub_probseg GM", "sub_probseg WM"]
    np.testing.assert_allclose(pmeta["scale"], zooms)


def test_dseg_names_come_from_its_tsv(tmp_path, mri_outputs):
    path = tmp_path / "other_dseg.nii.gz"
    nib.save(nib.Nifti1Image(np.array(mri_outputs.truth, np.uint8), np.eye(4)), str(path))
    (tmp_path / "other_dseg.tsv").write_text("index\tname\n0\tbackground\n2\tcortex\n3\twhite matter\n")
    (_, meta, _), = reader.read(str(path))
    names = dict(zip(meta["features"]["index"], meta["features"]["name"]))
    assert names == {0: "background", 2: "cortex", 3: "white matter"}


def test_mgz_is_read_like_nifti(tmp_path, mri_outputs):
    path = tmp_path / "scan.mgz"
    nib.save(nib.MGHImage(mri_outputs.image.astype(np.float32), mri_outputs.affine), str(path))
    (data, meta, kind), = reader.read(str(path))
    assert kind == "image" and data.shape == mri_outputs.image.shape
    np.testing.assert_allclose(meta["scale"], np.sqrt((mri_outputs.affine[:3, :3] ** 2).sum(0)), atol=1e-5)


# --- EM readers -----------------------------------------------------------------------

def test_em_run_is_read_lazily_in_nanometres(em_run):
    layers = by_name(reader.napari_get_reader(str(em_run.out))(str(em_run.out)))
    assert set(layers) == {"affinities z", "affinities y", "affinities x", "fragments", "segmentation"}
    affinities, ameta, akind = layers["affinities z"]
    assert akind == "image" and ameta["channel_axis"] == 0 and affinities.shape == (3, 40, 56, 48)
    assert ameta["colormap"] == ["red", "green", "blue"]
    for name in ("fragments", "segmentation"):
        data, meta, kind = layers[name]
        assert kind == "labels" and isinstance(data, da.Array), name
        assert meta["scale"] == (8.0, 8.0, 8.0) and meta["translate"] == (80.0, 0.0, 16.0) and meta["units"] == "nm"
        assert meta["metadata"]["psc"]["run"] == str(em_run.out)
    assert isinstance(affinities, da.Array)
    assert layers["fragments"][1]["visible"] is False

    raw = by_name(reader.read(str(em_run.raw)))
    assert raw["raw"][2] == "image" and raw["labels"][2] == "labels"
    assert isinstance(raw["raw"][0], da.Array) and raw["raw"][1]["contrast_limits"] == (0.0, 255.0)
    (single, smeta, skind), = reader.read(str(em_run.raw / "labels"))
    assert skind == "labels" and smeta["name"] == "labels" and smeta["scale"] == (8.0, 8.0, 8.0)
    np.testing.assert_array_equal(np.asarray(single), em_run.labels)


def test_a_volume_larger_than_memory_opens_at_once(tmp_path):
    """64 GiB of uint64 labels (nothing written: every chunk is the fill value)."""
    from psc.pipelines.em.volumes import create_volume

    create_volume(tmp_path / "huge.zarr", "segmentation", (2048, 2048, 2048), "uint64", (64, 256, 256), (8, 8, 8))
    (data, meta, kind), = reader.read(str(tmp_path / "huge.zarr"))
    assert kind == "labels" and isinstance(data, da.Array) and data.nbytes == 2**36
    assert int(data[1000, 500:600, 500:600].sum().compute()) == 0


def test_non_psc_paths_are_declined(tmp_path):
    import zarr

    zarr.open_group(str(tmp_path / "pyramid.zarr"), mode="w").create_group("0")
    assert reader.napari_get_reader(str(tmp_path / "pyramid.zarr")) is None
    assert reader.napari_get_reader(str(tmp_path)) is None


# --- writer ---------------------------------------------------------------------------

def test_nifti_round_trip_keeps_the_affine_and_names(tmp_path, mri_outputs):
    (labels, meta, _), = reader.read(str(mri_outputs.dseg))
    written = write_labels(str(tmp_path / "edited_dseg.nii.gz"), labels, meta)
    assert written == [str(tmp_path / "edited_dseg.nii.gz"), str(tmp_path / "edited_dseg.tsv")]
    image = nib.load(written[0])
    np.testing.assert_allclose(image.affine, mri_outputs.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(image.dataobj), mri_outputs.truth)
    assert image.get_data_dtype() == np.uint8
    (again, ameta, _), = reader.read(written[0])
    assert list(ameta["features"]["name"]) == ["background", "CSF", "GM", "WM"]


def test_nifti_without_a_source_affine_uses_scale_and_translate(tmp_path):
    labels = np.zeros((5, 6, 7), np.int32)
    labels[1:3, 2:4, 3:6] = 300
    write_labels(str(tmp_path / "x.nii"), labels, {"name": "x", "scale": (2.0, 3.0, 4.0), "translate": (1, 2, 3)})
    image = nib.load(str(tmp_path / "x.nii"))
    np.testing.assert_allclose(image.affine, [[2, 0, 0, 1], [0, 3, 0, 2], [0, 0, 4, 3], [0, 0, 0, 1]])
    assert image.get_data_dtype() == np.uint16


def test_zarr_writer_writes_psc_layout_from_a_lazy_layer(tmp_path, em_run):
    from psc.pipelines.em.volumes import open_volume

    data, meta, _ = by_name(reader.read(str(em_run.out)))["segmentation"]
    meta = {**meta, "name": "proofread segmentation"}
    assert write_labels(str(tmp_path / "edit.zarr"), data, meta) == [str(tmp_path / "edit.zarr")]
    volume = open_volume(tmp_path / "edit.zarr", "proofread_segmentation")
    assert volume.voxel_size == (8.0, 8.0, 8.0) and volume.offset == (80.0, 0.0, 16.0)
    np.testing.assert_array_equal(volume.array[:], np.asarray(data))
    with pytest.raises(ValueError, match="nii.gz"):
        write_labels(str(tmp_path / "x.tif"), data, meta)
    # a multiscale layer (a run with downsample levels) is saved at level 0
    levels = [data, np.asarray(data)[::2, ::2, ::2]]
    write_labels(str(tmp_path / "multi.zarr"), levels, {**meta, "multiscale": True})
    np.testing.assert_array_equal(open_volume(tmp_path / "multi.zarr", "proofread_segmentation").array[:],
                                  np.asarray(data))


# --- scoring --------------------------------------------------------------------------

def merged_and_split(labels: np.ndarray) -> tuple[np.ndarray, int, int, int]:
    """Ground truth with two objects merged (b into a) and one split in half (c)."""
    pred = labels.copy()
    ids, counts = np.unique(labels, return_counts=True)
    a, b, c = (int(i) for i in ids[np.argsort(-counts)][:3])
    pred[labels == b] = a
    zs = np.nonzero(labels == c)[0]
    pred[(labels == c) & (np.arange(labels.shape[0])[:, None, None] >= np.median(zs))] = labels.max() + 1
    return pred, a, b, c


def test_em_scores_equal_evaluate_and_find_the_merge_and_split(em_run):
    gt = em_run.labels
    pred, a, b, c = merged_and_split(gt)
    result = scoring.score_em(da.from_array(pred, chunks=(7, 56, 48)), gt)
    expected = evaluate(pred, gt)
    for key, value in expected.items():
        assert result.scores[key] == pytest.approx(value, abs=1e-12), key
    merge = result.merges[0]
    assert (merge.segment, {merge.gt, *merge.others}) == (a, {a, b})
    assert len(result.merges) == 1 and merge.voxels == int((gt == b).sum())
    split = result.splits[0]
    assert split.gt == c and len(result.splits) == 1
    # centres lie on the error: the merged-in object; the smaller piece of the split one
    assert gt[tuple(int(round(v)) for v in merge.centre)] == b
    at = tuple(int(round(v)) for v in split.centre)
    assert gt[at] == c and pred[at] == split.others[0] and split.segment != split.others[0]


def test_perfect_segmentation_has_no_errors(em_run):
    result = scoring.score_em(em_run.labels, em_run.labels)
    assert result.scores["voi"] == 0 and result.merges == [] and result.splits == []


def test_dice_table_equals_dice_per_class(mri_outputs):
    truth = mri_outputs.truth
    pred = truth.copy()
    pred.flat[np.flatnonzero(truth == 3)[:300]] = 2
    pred[10:14] = 1
    rows = scoring.dice_table(pred, truth, {0: "background", 1: "CSF", 2: "GM", 3: "WM"})
    expected = dice_per_class(pred, truth, [1, 2, 3])
    assert [(c, n) for c, n, _ in rows] == [(1, "CSF"), (2, "GM"), (3, "WM")]
    for c, _, value in rows:
        assert value == pytest.approx(expected[c], nan_ok=True)


# --- sample data ----------------------------------------------------------------------

def test_sample_data_providers_return_layers():
    from psc.plugins.napari._sample_data import em_cube, t1_brain

    (t1, meta, kind), = t1_brain()
    assert kind == "image" and t1.ndim == 3 and meta["scale"] == (1.0, 1.0, 1.0) and meta["units"] == "mm"
    (raw, rmeta, rkind), (labels, lmeta, lkind) = em_cube()
    assert (rkind, lkind) == ("image", "labels") and raw.shape == labels.shape == (64, 128, 128)
    assert rmeta["scale"] == (8.0, 8.0, 8.0) and labels.max() > 10


# --- psc-view -------------------------------------------------------------------------

def test_psc_view_dry_run_lists_inputs_with_their_outputs(mri_outputs, em_run, capsys):
    from psc.app.view import main

    assert main(["--dry-run", str(mri_outputs.scan)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["image", "sub"], ["image", "sub_probseg"], ["labels", "sub_dseg"]]
    assert main(["--dry-run", str(mri_outputs.dseg)]) == 0  # an output brings its scan along
    assert len(capsys.readouterr().out.splitlines()) == 3

    assert main(["--dry-run", str(em_run.out), str(em_run.raw)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["raw", "affinities", "fragments", "segmentation", "labels"]
    assert all("lazy" in line and "scale 8 x 8 x 8 nm at (80, 0, 16)" in line for line in lines)

    assert main(["--dry-run", str(em_run.raw)]) == 0  # RAW.zarr brings RAW_psc.zarr
    assert len(capsys.readouterr().out.splitlines()) == 5

    assert main(["--dry-run", str(em_run.folder / "nothing.nii.gz")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_threshold_lookup_reproduces_the_relabelled_segmentation(em_run):
    """What the Threshold widget relies on: fragments mapped at the run's threshold equal
    the segmentation the relabel stage wrote."""
    from psc.pipelines.em.volumes import open_volume

    graph = GraphStore(em_run.out / "graph.sqlite")
    mapped = apply_lookup(open_volume(em_run.out, "fragments").array[:], *graph.lookup(0.5))
    graph.close()
    np.testing.assert_array_equal(mapped, open_volume(em_run.out, "segmentation").array[:])
