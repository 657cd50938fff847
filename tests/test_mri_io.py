"""Every input format reads to the same voxels and RAS affine; bad files are refused
with one sentence naming them."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from mri_fixtures import brain_phantom, oblique_affine, save_nifti
from psc.utils.errors import InputError
from psc.pipelines.mri.io import read_scan, write_nifti

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ibsr18"


@pytest.fixture
def reference(tmp_path):
    image, _ = brain_phantom()
    return save_nifti(tmp_path / "ref.nii.gz", image, oblique_affine(flip=(-1, 1, 1)))


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """One DICOM file per slice with the geometry tags GDCM needs to rebuild the volume."""
    folder.mkdir()
    image = sitk.Cast(image, sitk.sitkInt16)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.99"
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "MR", "0020|000d": series + ".1", "0020|000e": series + ".2",
            "0020|0037": "\\".join(f"{v:.10f}" for v in (direction[0], direction[3], direction[6],
                                                       direction[1], direction[4], direction[7])),
            "0020|0032": "\\".join(f"{v:.10f}" for v in origin), "0020|0013": str(k + 1),
            "0028|0030": f"{image.GetSpacing()[1]:.10f}\\{image.GetSpacing()[0]:.10f}",
            "0018|0050": f"{image.GetSpacing()[2]:.10f}",
        }.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(sl)


@pytest.mark.parametrize("fmt", ["nii", "mgz", "nrrd", "nhdr", "mha", "mhd", "dicom"])
def test_every_format_reads_to_the_same_voxels_and_affine(reference, tmp_path, fmt):
    ref = read_scan(reference)
    if fmt in ("nii", "mgz"):
        image = nib.load(str(reference))
        cls = nib.MGHImage if fmt == "mgz" else nib.Nifti1Image
        path = tmp_path / f"scan.{fmt}"
        nib.save(cls(np.asarray(image.dataobj), image.affine), str(path))
    else:  # SimpleITK converts the NIfTI's geometry itself: an independent reference
        itk = sitk.ReadImage(str(reference))
        path = tmp_path / ("dicom" if fmt == "dicom" else f"scan.{fmt}")
        write_dicom_series(itk, path) if fmt == "dicom" else sitk.WriteImage(itk, str(path))
    # Compared in world space: a DICOM reader may order slices the other way round.
    array, affine = canonical(read_scan(path))
    ref_array, ref_affine = canonical(ref)
    np.testing.assert_array_equal(array, ref_array)
    np.testing.assert_allclose(affine, ref_affine, atol=1e-4)


def canonical(scan):
    """Voxels and affine reoriented to the closest RAS axis order (world unchanged)."""
    ornt = nib.orientations.io_orientation(scan.affine)
    transform = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    array = nib.orientations.apply_orientation(scan.array, transform)
    return array, scan.affine @ nib.orientations.inv_ornt_aff(transform, scan.array.shape)


def test_singleton_fourth_axis_is_squeezed(tmp_path):
    image, _ = brain_phantom()
    path = save_nifti(tmp_path / "s.nii.gz", image[..., None], np.eye(4))
    assert read_scan(path).array.shape == image.shape


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"), ("text", "not a readable image"), ("nan", "NaN"),
    ("flat", "2-D"), ("slice", "single slice"), ("series", "4-D series of 3 volumes"), ("empty", "empty"),
    ("corrupt", "not a readable image"), ("corrupt-mha", "not a readable image"), ("no-dicom", "without a DICOM"),
])
def test_bad_inputs_are_refused_with_a_clear_sentence(tmp_path, case, message):
    path = tmp_path / f"{case}.nii.gz"
    image, _ = brain_phantom((12, 12, 12))
    if case == "text":
        path = tmp_path / "notes.nii"
        path.write_text("this is not an image\n")
    elif case == "nan":
        data = image.astype(np.float32)
        data[3, 3, 3] = np.nan
        save_nifti(path, data, np.eye(4))
    elif case == "flat":
        save_nifti(path, image[:, :, 0], np.eye(4))
    elif case == "series":
        save_nifti(path, np.stack([image] * 3, -1), np.eye(4))
    elif case == "empty":
        save_nifti(path, np.zeros_like(image), np.eye(4))
    elif case == "slice":
        save_nifti(path, image[:, :, :1], np.eye(4))
    elif case == "corrupt":
        save_nifti(path, image, np.eye(4))
        path.write_bytes(path.read_bytes()[:200])
    elif case == "corrupt-mha":
        path = tmp_path / "scan.mha"
        sitk.WriteImage(sitk.GetImageFromArray(image), str(path))
        path.write_bytes(path.read_bytes()[:300])
    elif case == "no-dicom":
        path = tmp_path / "folder"
        path.mkdir()
        (path / "readme.txt").write_text("no DICOM here\n")
    with pytest.raises(InputError, match=message) as info:
        read_scan(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_written_labels_keep_grid_and_codes(reference, tmp_path):
    scan = read_scan(reference)
    out = tmp_path / "x_dseg.nii.gz"
    write_nifti((scan.array > 50).astype(np.uint8), scan, out)
    back = nib.load(str(out))
    assert back.shape == scan.array.shape and back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, scan.affine, atol=1e-5)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_empty_volume_is_accepted_when_asked(tmp_path):
    """An all-background label map is a valid prediction to score, not a bad scan."""
    path = save_nifti(tmp_path / "none_dseg.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    assert not read_scan(path, allow_empty=True).array.any()


def test_uncoded_nifti_round_trips_to_the_same_affine(tmp_path):
    """qform and sform codes both 0: nibabel falls back to the voxel sizes; the output
    must fall back to the same affine, not gain or lose a flip."""
    image, _ = brain_phantom((32, 24, 32))  # at least MIN_EXTENT_MM across
    affine = np.diag([-0.9, 1.5, 0.9, 1.0])
    scan = read_scan(save_nifti(tmp_path / "u.nii", image, affine, qcode=0, scode=0))
    write_nifti(image > 50, scan, tmp_path / "u_dseg.nii.gz")
    back = nib.load(str(tmp_path / "u_dseg.nii.gz"))
    np.testing.assert_allclose(back.affine, scan.affine, atol=1e-5)
    assert int(back.header["qform_code"]) == 0 and int(back.header["sform_code"]) == 0


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_reads_real_ibsr_scan():
    scan = read_scan(DATA / "IBSR_01" / "IBSR_01.nii.gz")
    assert scan.array.shape == (256, 128, 256)
    assert np.allclose(np.sqrt((scan.affine[:3, :3] ** 2).sum(0)), (0.9375, 1.5, 0.9375), atol=1e-3)


# --- issue 13: one validation place (validate_scan, called by read_scan) -------------

NIFTI1_OFFSETS = {"sizeof_hdr": (0, "<i"), "pixdim": (76, "<8f"), "qform_code": (252, "<h"),
                  "sform_code": (254, "<h"), "srow_x": (280, "<4f"), "srow_y": (296, "<4f"), "srow_z": (312, "<4f")}


def patched_nifti(path, array, affine=np.eye(4), **fields):
    """An uncompressed NIfTI-1 with raw header fields overwritten after nibabel wrote
    it: the broken headers nibabel itself would never write."""
    import struct

    save_nifti(path, array, affine)
    raw = bytearray(path.read_bytes())
    for name, value in fields.items():
        offset, fmt = NIFTI1_OFFSETS[name]
        raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, *np.atleast_1d(value))
    path.write_bytes(bytes(raw))
    return path


def bad_scan(case, tmp_path):
    """A scan of each class psc-segment must refuse, as a file; and the words the
    refusal must contain."""
    image, _ = brain_phantom()  # 36 x 30 x 34 voxels: big enough at 1 mm
    path = tmp_path / f"{case}.nii"
    if case == "complex":
        return save_nifti(path, image.astype(np.complex64) * (1 + 1j), np.eye(4)), "complex voxels"
    if case == "inf":
        data = image.astype(np.float32)
        data[4, 4, 4] = np.inf
        return save_nifti(path, data, np.eye(4)), "NaN or infinite voxels"
    if case == "constant":
        return save_nifti(path, np.full(image.shape, 7, np.int16), np.eye(4)), "constant (every voxel is 7)"
    if case == "zero":
        return save_nifti(path, np.zeros(image.shape, np.int16), np.eye(4)), "empty (every voxel is zero)"
    if case == "too-small":
        small, _ = brain_phantom((16, 16, 16))
        return save_nifti(path, small, np.eye(4)), "too small to hold a brain"
    if case == "tiny-voxels":  # a 1 mm scan whose header says 0.1 mm
        return save_nifti(path, image, np.diag([0.1, 0.1, 0.1, 1.0])), "too small to hold a brain"
    if case == "zero-voxel":  # sform (code 2) with a zero column: voxel size 0 along i
        return patched_nifti(path, image, srow_x=(0, 0, 0, 0)), "voxel sizes 0 x 1 x 1 mm"
    if case == "nan-affine":
        return patched_nifti(path, image, srow_y=(0, np.nan, 0, 0)), "NaN or infinite entries"
    if case == "singular":  # every voxel size non-zero, yet two voxel axes point the same way
        return patched_nifti(path, image, srow_x=(1, 1, 0, 0), srow_y=(1, 1, 0, 0)), "singular"
    if case == "repaired-pixdim":  # no qform/sform, zero voxel size: nibabel would guess 1 mm
        return (patched_nifti(path, image, qform_code=0, sform_code=0, pixdim=(1, 0, 1, 1, 1, 1, 1, 1)),
                "pixdim[1,2,3] should be non-zero")
    if case == "repaired-negative":
        return (patched_nifti(path, image, qform_code=0, sform_code=0, pixdim=(1, -1, 1, 1, 1, 1, 1, 1)),
                "should be positive")
    if case == "repaired-sizeof":
        return patched_nifti(path, image, sizeof_hdr=340), "sizeof_hdr should be 348"
    if case == "repaired-code":
        return patched_nifti(path, image, qform_code=7), "qform_code 7 not valid"
    raise AssertionError(case)


BAD_SCANS = ["complex", "inf", "constant", "zero", "too-small", "tiny-voxels", "zero-voxel", "nan-affine", "singular",
             "repaired-pixdim", "repaired-negative", "repaired-sizeof", "repaired-code"]


@pytest.mark.parametrize("case", BAD_SCANS)
def test_read_scan_refuses_each_class_of_bad_scan(case, tmp_path, capfd):
    path, words = bad_scan(case, tmp_path)
    with pytest.raises(InputError) as info:
        read_scan(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message, message
    assert capfd.readouterr().err == ""  # nibabel's own repair messages are not printed


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    from mri_fixtures import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("weights") / "tiny.pt")


@pytest.mark.parametrize("case", BAD_SCANS)
def test_psc_segment_refuses_each_bad_scan_in_one_line_writing_nothing(case, tmp_path, tiny_weights, capfd):
    from psc.app.segment import main as segment_main

    path, words = bad_scan(case, tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = segment_main([str(path), "--weights", str(tiny_weights), "-o", str(tmp_path / "out"), "--device", "cpu"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("psc-segment: error: ") and words in err[0], err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # not even the output folder


def test_label_maps_may_be_constant_or_small_but_scans_may_not(tmp_path):
    """A mask of the whole grid or a label map with one class is valid; as a T1 it is not."""
    ones = save_nifti(tmp_path / "mask.nii.gz", np.ones((10, 10, 10), np.uint8), np.eye(4))
    assert read_scan(ones, labels=True).array.all()
    with pytest.raises(InputError, match="constant"):
        read_scan(ones)


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")
def test_ibsr_scans_and_labels_pass_validation():
    """IBSR files are 4-D with a singleton last axis, int16, 1 x 1.5 x 1 mm."""
    scan = read_scan(DATA / "IBSR_07" / "IBSR_07.nii.gz")
    assert scan.array.shape == (256, 128, 256) and scan.array.dtype == np.int16
    assert read_scan(DATA / "IBSR_07" / "IBSR_07_seg.nii.gz", labels=True).array.max() == 3
