"""Scans in and label maps out, with the geometry kept exactly.

Reading: nibabel for NIfTI/MGZ, SimpleITK for NRRD, MHA/MHD and DICOM series (ITK's
LPS geometry converted to a RAS affine; SimpleITK is imported only when such a file is
read, so the names here cost nothing to import, e.g. for the napari reader). Writing:
NIfTI on the input's own grid and affine, qform/sform codes copied from a NIfTI input,
always through a temporary file renamed into place, so a crash never leaves a
half-written output.

The one home of MRI file names: ``NIBABEL_EXTENSIONS``/``SCAN_EXTENSIONS`` and
``scan_stem`` (the napari plugin, psc-eval, psc-view and training all use these).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from psc.utils.errors import InputError
from psc.utils.files import atomic_write

NIBABEL_EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".mgh")
SITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
SCAN_EXTENSIONS = NIBABEL_EXTENSIONS + SITK_EXTENSIONS
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Scan:
    path: Path
    array: np.ndarray  # 3-D, voxel axes (i, j, k) of ``affine``
    affine: np.ndarray  # voxel -> RAS+ world, mm
    header: nib.Nifti1Header | None = None  # set for NIfTI inputs, to copy qform/sform codes

    @property
    def stem(self) -> str:
        return scan_stem(self.path)

    @property
    def voxel_volume(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))


def scan_stem(path: str | Path) -> str:
    path = Path(path)
    for ext in SCAN_EXTENSIONS:
        if path.name.lower().endswith(ext):
            return path.name[: -len(ext)]
    return path.name if path.is_dir() else path.stem


def is_scan_file(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(SCAN_EXTENSIONS)


def _sitk_to_array_affine(image) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise InputError(f"is {image.GetDimension()}-D; psc segments 3-D volumes")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("has vector voxels (several components); psc needs one intensity per voxel")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # ITK (z, y, x) -> (i, j, k)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return array, LPS_TO_RAS @ lps


def _read_dicom_series(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError("is a folder without a DICOM series")
    if len(series) > 1:
        raise InputError(f"holds {len(series)} DICOM series; give the folder of one series")
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), series[0]))
    try:
        image = reader.Execute()
    except RuntimeError:
        raise InputError("holds a DICOM series that SimpleITK could not read (missing or corrupt slices?)") from None
    return _sitk_to_array_affine(image)


def read_scan(path: str | Path, allow_empty: bool = False) -> Scan:
    """Read one 3-D scan; a trailing singleton 4th axis is dropped (IBSR files have one).
    An all-zero volume is refused (nothing to segment) unless ``allow_empty``: a label
    map that found no tissue is still a valid thing to score."""
    path = Path(path)
    try:
        return _check(_read(path), allow_empty)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None


def _read(path: Path) -> Scan:
    if not path.exists():
        raise InputError("no such file or folder")
    header = None
    if path.is_dir():
        array, affine = _read_dicom_series(path)
    elif path.name.lower().endswith(SITK_EXTENSIONS):
        import SimpleITK as sitk

        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            raise InputError("is not a readable image (SimpleITK could not parse it)") from None
        array, affine = _sitk_to_array_affine(image)
    else:
        try:
            image = nib.load(str(path))
            array = np.asanyarray(image.dataobj)
        except Exception as error:  # nibabel raises many types for corrupt files
            raise InputError(f"is not a readable image ({type(error).__name__}: {str(error)[:120]})") from None
        affine = image.affine
        if isinstance(image.header, nib.Nifti1Header):
            header = image.header
    return Scan(path, array, np.asarray(affine, dtype=np.float64), header)


def _check(scan: Scan, allow_empty: bool = False) -> Scan:
    array = scan.array
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 4:
        raise InputError(f"is a 4-D series of {array.shape[3]} volumes; psc segments one 3-D volume")
    if array.ndim != 3:
        raise InputError(f"is {array.ndim}-D with shape {tuple(array.shape)}; psc segments 3-D volumes")
    if min(array.shape) < 2:
        raise InputError(f"is a single slice (shape {tuple(array.shape)}); psc segments 3-D volumes")
    if not np.issubdtype(array.dtype, np.number):
        raise InputError(f"has non-numeric voxels ({array.dtype})")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError("contains NaN or infinite voxels")
    if not allow_empty and not np.any(array):
        raise InputError("is empty (every voxel is zero)")
    scan.array = array
    return scan


def write_nifti(array: np.ndarray, like: Scan | np.ndarray, path: Path, dtype=np.uint8) -> None:
    """NIfTI on ``like``'s grid: a scan (its affine, and its qform/sform codes if it was
    NIfTI) or a voxel -> RAS affine (codes 1, scanner), written atomically. psc-segment's
    outputs and the napari plugin's Labels writer both write through here."""
    affine = np.asarray(like.affine if isinstance(like, Scan) else like, dtype=np.float64)
    header = like.header if isinstance(like, Scan) else None
    image = nib.Nifti1Image(np.asarray(array, dtype=dtype), affine)
    if header is not None:
        image.set_qform(affine, code=int(header["qform_code"]))
        image.set_sform(affine, code=int(header["sform_code"]))
    else:
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    atomic_write(path, lambda tmp: nib.save(image, tmp))


def write_text(text: str, path: Path) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
