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
    image, _ = brain_phantom((12, 12, 12))
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
