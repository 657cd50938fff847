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


def test_end_to_end_outputs(scan, weights, tmp_path, capsys):
    out = tmp_path / "out"
    assert segment_main([str(scan), "--weights", str(weights), "-o", str(out), "--probabilities"]) == 0
    printed = capsys.readouterr().out
    assert "sub-01_T1w_dseg.nii.gz" in printed and "sub-01_T1w_qc.png" in printed and " ml" in printed
    names = sorted(p.name for p in out.iterdir())
    assert names == ["sub-01_T1w_dseg.json", "sub-01_T1w_dseg.nii.gz", "sub-01_T1w_dseg.tsv",
                     "sub-01_T1w_probseg.nii.gz", "sub-01_T1w_qc.png", "sub-01_T1w_volumes.tsv"]
    names = names[1:]  # the sidecar: test_sidecar_records_the_run
    import nibabel as nib

    src, dseg, prob = (nib.load(str(p)) for p in (scan, out / names[0], out / names[2]))
    assert dseg.shape == src.shape and dseg.get_data_dtype() == np.uint8
    np.testing.assert_allclose(dseg.affine, src.affine, atol=1e-5)
    for image in (dseg, prob):  # save_nifti wrote qform code 1, sform code 2
        assert (int(image.header["qform_code"]), int(image.header["sform_code"])) == (1, 2)
    np.testing.assert_allclose(np.asarray(prob.dataobj).sum(-1), 1.0, atol=1e-4)
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
    if kind == "bad-card":
        (tmp_path / "broken.pt").write_bytes(b"not weights")
        (tmp_path / "broken.json").write_text("{not json")
        return [str(scan), "--weights", str(tmp_path / "broken.pt")]
    if kind == "overlap":
        return [str(scan), "--overlap", "1.5"]
    if kind == "device":
        return [str(scan), "--device", "tpu"]
    if kind == "mask":
        return [str(scan), "--mask", str(save_nifti(tmp_path / "mask.nii.gz", (image > 0).astype(np.uint8),
                                                      np.eye(4)))]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "not-an-image", "nan", "2d", "4d", "unwritable", "em", "weights",
                                  "bad-card", "overlap", "device", "mask"])
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
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # not even the output folder


# --- issue 13: input expansion (folders with label maps, globs matching nothing,
# --- repeated inputs, two inputs writing the same outputs) -----------------------------


def run_segment(args, weights, capsys):
    code = segment_main([*map(str, args), "--weights", str(weights), "--device", "cpu"])
    captured = capsys.readouterr()
    # Plausibility warnings (a phantom is no adult brain) are not errors.
    return code, captured.out, [line for line in captured.err.strip().splitlines() if ": warning: " not in line]


def test_a_folder_in_training_layout_segments_the_scan_not_its_label_map(weights, tmp_path, capsys):
    image, truth = brain_phantom()
    folder = tmp_path / "data"
    folder.mkdir()
    save_nifti(folder / "case1.nii.gz", image, np.eye(4))
    for suffix in ("_seg", "_dseg", "_labels", "_label"):  # every label map name psc knows
        save_nifti(folder / f"case1{suffix}.nii.gz", truth, np.eye(4))
    code, out, err = run_segment([folder, "-o", tmp_path / "out"], weights, capsys)
    assert code == 0 and err == []
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "case1_dseg.nii.gz" in names and out.count("case1.nii.gz:") == 1
    assert not any(n.startswith(("case1_seg_", "case1_labels_", "case1_label_", "case1_dseg_")) for n in names)
    # A glob matching both: the same.
    code, out, err = run_segment([folder / "case1*.nii.gz", "-o", tmp_path / "glob", "--force"], weights, capsys)
    assert code == 0 and sorted(p.name for p in (tmp_path / "glob").iterdir()) == sorted(
        p.name for p in (tmp_path / "out").iterdir())


def test_a_folder_of_label_maps_only_is_one_error_line(weights, tmp_path, capsys):
    _, truth = brain_phantom()
    (tmp_path / "labels").mkdir()
    save_nifti(tmp_path / "labels" / "case1_seg.nii.gz", truth, np.eye(4))
    code, _, err = run_segment([tmp_path / "labels", "-o", tmp_path / "out"], weights, capsys)
    assert code == 1 and len(err) == 1 and "only label maps" in err[0] and "case1_seg.nii.gz" in err[0], err
    assert not (tmp_path / "out").exists()


def test_a_glob_matching_nothing_is_reported_and_the_other_inputs_still_run(scan, weights, tmp_path, capsys):
    pattern = tmp_path / "missing-*" / "T1.nii.gz"
    code, out, err = run_segment([pattern, scan, "-o", tmp_path / "out"], weights, capsys)
    assert code == 1  # a failure, as a scan that fails
    assert err == [f"psc-segment: error: {pattern}: no file matches"]
    assert (tmp_path / "out" / "sub-01_T1w_dseg.nii.gz").is_file() and "sub-01_T1w_dseg.nii.gz" in out
    code, _, err = run_segment([pattern, "-o", tmp_path / "out2"], weights, capsys)
    assert code == 1 and len(err) == 1 and not (tmp_path / "out2").exists()


def test_the_same_input_given_twice_is_segmented_once(scan, weights, tmp_path, capsys):
    alias = tmp_path / "." / scan.name
    code, out, err = run_segment([scan, alias, scan.parent / "*_T1w.nii.gz", "-o", tmp_path / "out"], weights, capsys)
    assert code == 0 and err == [], err
    assert out.count("sub-01_T1w.nii.gz:") == 1


def test_two_inputs_writing_the_same_outputs_are_refused_before_any_work(weights, tmp_path, capsys):
    image, _ = brain_phantom()
    for subject in ("sub-01", "sub-02"):
        (tmp_path / subject).mkdir()
        save_nifti(tmp_path / subject / "T1.nii.gz", image, np.eye(4))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = run_segment([tmp_path / "sub-*" / "T1.nii.gz", "-o", tmp_path / "out", "--force"], weights,
                                 capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("psc-segment: error: ") and "sub-01" in err[0] and "sub-02" in err[0]
    assert "T1_dseg.nii.gz" in err[0]
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    # Beside each input they do not collide.
    code, _, err = run_segment([tmp_path / "sub-*" / "T1.nii.gz"], weights, capsys)
    assert code == 0 and err == [], err
    assert all((tmp_path / s / "T1_dseg.nii.gz").is_file() for s in ("sub-01", "sub-02"))


@pytest.mark.parametrize("case,words", [
    ("labels-9-255", "labels 9, 255"), ("t1-int", "distinct values"), ("t1-float", "fractional"),
])
def test_eval_refuses_a_prediction_that_is_not_a_label_map_of_the_table(case, words, tmp_path, capsys):
    image, truth = brain_phantom()
    gt = save_nifti(tmp_path / "gt.nii.gz", truth, np.eye(4))
    if case == "labels-9-255":
        pred = truth.copy()
        pred[0, 0, 0], pred[1, 1, 1] = 9, 255
    else:  # the T1 given as the prediction
        noise = np.random.default_rng(1).normal(0, 25, image.shape) * (image > 0)
        t1 = image * 4.1 + noise  # grey levels of a real T1: hundreds of distinct values
        pred = t1.astype(np.int16) if case == "t1-int" else t1
    path = save_nifti(tmp_path / "x_dseg.nii.gz", pred, np.eye(4))
    assert eval_main([str(path), str(gt)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psc-eval: error: x_dseg.nii.gz is not a label map"), err
    assert words in err[0] and "Dice" not in captured.out


def test_eval_refuses_a_t1_found_as_the_ground_truth(tmp_path, capsys):
    """A truth folder holding only the scans: the T1 pairs by stem and is refused."""
    image, truth = brain_phantom()
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    save_nifti(tmp_path / "pred" / "sub-01_dseg.nii.gz", truth, np.eye(4))
    save_nifti(tmp_path / "gt" / "sub-01.nii.gz", image, np.eye(4))
    assert eval_main([str(tmp_path / "pred"), str(tmp_path / "gt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sub-01.nii.gz is not a label map" in err[0], err


# --- end of the issue-13 input-expansion block ------------------------------------------


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
    assert result["dice"]["CSF"] is None  # absent from both: no evidence, not a perfect score
    assert result["dice_mean"] == pytest.approx((result["dice"]["GM"] + result["dice"]["WM"]) / 2)
    assert eval_main([str(tmp_path / "pred"), str(tmp_path / "gt")]) == 0  # the table
    assert "Dice GM" in capsys.readouterr().out
    save_nifti(tmp_path / "other.nii.gz", truth[:-1], affine)
    assert eval_main([str(tmp_path / "other.nii.gz"), str(tmp_path / "gt" / "sub-01_seg.nii.gz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psc-eval: error:") and "shape" in err[0]


def test_eval_scores_an_empty_prediction_and_refuses_a_probability_map(tmp_path, capsys):
    import json

    _, truth = brain_phantom()
    gt = save_nifti(tmp_path / "gt.nii.gz", truth, np.eye(4))
    empty = save_nifti(tmp_path / "empty_dseg.nii.gz", np.zeros_like(truth), np.eye(4))
    assert eval_main([str(empty), str(gt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["empty"]["dice"]["WM"] == 0.0
    prob = save_nifti(tmp_path / "prob.nii.gz", (truth / 3.0).astype(np.float32), np.eye(4))
    assert eval_main([str(prob), str(gt)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a label map" in err[0]


def test_bundled_sample_is_a_skull_stripped_t1():
    from psc.pipelines.mri.io import read_scan
    from psc.pipelines.mri.sample import sample_t1_path

    scan = read_scan(sample_t1_path())
    assert scan.array.ndim == 3 and scan.voxel_volume == pytest.approx(1.0)
    # Skull-stripped: the brain fills about a fifth of the box and the faces are empty
    # (but the bottom one, where the template's field of view cuts the brainstem).
    assert 0.1 < (scan.array != 0).mean() < 0.35
    faces = (scan.array[0], scan.array[-1], scan.array[:, 0], scan.array[:, -1], scan.array[:, :, -1])
    assert not any(face.any() for face in faces)
