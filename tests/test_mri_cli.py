"""psc-segment and psc-eval as a user runs them: outputs, and one clear error line
(exit code non-zero, no traceback, nothing written) for every kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mri_fixtures import brain_phantom, oblique_affine, save_nifti, save_tiny_model
from psc.app.evaluate import main as eval_main
from psc.app.segment import main as segment_main


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("weights") / "tiny.pt")


@pytest.fixture
def scan(tmp_path):
    image, _ = brain_phantom()
    return save_nifti(tmp_path / "sub-01_T1w.nii.gz", image, oblique_affine())


def test_end_to_end_outputs(scan, weights, tmp_path):
    out = tmp_path / "out"
    assert segment_main([str(scan), "--weights", str(weights), "-o", str(out), "--probabilities"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["sub-01_T1w_dseg.nii.gz", "sub-01_T1w_dseg.tsv", "sub-01_T1w_probseg.nii.gz",
                     "sub-01_T1w_qc.png", "sub-01_T1w_volumes.tsv"]
    import nibabel as nib

    src, dseg, prob = (nib.load(str(p)) for p in (scan, out / names[0], out / names[2]))
    assert dseg.shape == src.shape and dseg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(dseg.affine, src.affine, atol=1e-5)
    assert prob.shape == (*src.shape, 4) and prob.get_data_dtype() == np.float32
    assert (out / names[1]).read_text() == "index\tname\n0\tbackground\n1\tCSF\n2\tGM\n3\tWM\n"
    rows = [line.split("\t") for line in (out / names[4]).read_text().splitlines()[1:]]
    labelled = int((np.asarray(dseg.dataobj) > 0).sum())
    assert sum(int(r[2]) for r in rows) == labelled
    voxel = abs(np.linalg.det(src.affine[:3, :3]))
    assert abs(sum(float(r[3]) for r in rows) - labelled * voxel) < 1.0
    qc = np.asarray(Image.open(out / names[3]).convert("L"), dtype=float)
    assert qc.std() > 10  # a picture, not a blank


def test_refuses_to_overwrite_without_force(scan, weights, tmp_path, capsys):
    args = [str(scan), "--weights", str(weights), "-o", str(tmp_path / "out")]
    assert segment_main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    capsys.readouterr()
    assert segment_main(args) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "use --force" in err[0]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()} == before
    assert segment_main(args + ["--force"]) == 0


def bad_input(kind, tmp_path, scan):
    image, _ = brain_phantom((16, 16, 16))
    if kind == "missing":
        return [str(tmp_path / "nope.nii.gz")]
    if kind == "not-an-image":
        path = tmp_path / "notes.nii.gz"
        path.write_text("hello")
        return [str(path)]
    if kind == "nan":
        data = image.astype(np.float32)
        data[2, 2, 2] = np.nan
        return [str(save_nifti(tmp_path / "nan.nii.gz", data, np.eye(4)))]
    if kind == "2d":
        return [str(save_nifti(tmp_path / "flat.nii.gz", image[:, :, 0], np.eye(4)))]
    if kind == "4d":
        return [str(save_nifti(tmp_path / "series.nii.gz", np.stack([image] * 2, -1), np.eye(4)))]
    if kind == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("a file where the output folder should go")
        return [str(scan), "-o", str(blocker / "out")]
    if kind == "em":
        return [str(tmp_path / "raw.zarr")]
    if kind == "weights":
        return [str(scan), "--weights", str(tmp_path / "missing.pt")]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "not-an-image", "nan", "2d", "4d", "unwritable", "em", "weights"])
def test_bad_input_gives_one_error_line_and_writes_nothing(kind, scan, weights, tmp_path, capsys):
    args = bad_input(kind, tmp_path, scan)
    if "--weights" not in args:
        args += ["--weights", str(weights)]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out")]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = segment_main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("psc-segment: error: "), err
    assert "Traceback" not in err[0]
    after = sorted(p.name for p in tmp_path.rglob("*") if p.name != "out")
    assert [p for p in after if "_dseg" in p or "_qc" in p or p.startswith(".")] == []
    assert set(after) <= set(before) | {"out"}


def test_eval_matches_folders_and_scores(tmp_path, capsys):
    import json

    _, truth = brain_phantom()
    affine = oblique_affine()
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    save_nifti(tmp_path / "gt" / "sub-01.nii.gz", (truth * 50).astype(np.int16), affine)  # the scan: not the truth
    save_nifti(tmp_path / "gt" / "sub-01_seg.nii.gz", truth, affine)
    pred = truth.copy()
    pred[truth == 3][:10] = 2
    pred[:5] = 0
    save_nifti(tmp_path / "pred" / "sub-01_dseg.nii.gz", pred, affine)
    assert eval_main([str(tmp_path / "pred"), str(tmp_path / "gt"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["sub-01"]
    gm = 2 * ((pred == 2) & (truth == 2)).sum() / ((pred == 2).sum() + (truth == 2).sum())
    assert result["dice"]["GM"] == pytest.approx(gm)
    assert np.isnan(result["dice"]["CSF"])  # absent from both: no evidence, not a perfect score
    save_nifti(tmp_path / "other.nii.gz", truth[:-1], affine)
    assert eval_main([str(tmp_path / "other.nii.gz"), str(tmp_path / "gt" / "sub-01_seg.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psc-eval: error:") and "shape" in err[0]
