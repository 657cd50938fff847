"""Scans in and label maps out, with the geometry kept exactly.

Reading: nibabel for NIfTI/MGZ, SimpleITK for NRRD, MHA/MHD and DICOM series (ITK's
LPS geometry converted to a RAS affine; SimpleITK is imported only when such a file is
read, so the names here cost nothing to import, e.g. for the napari reader). Writing:
NIfTI on the input's own grid and affine, qform/sform codes copied from a NIfTI input,
always through a temporary file renamed into place, so a crash never leaves a
half-written output.

The one home of MRI file names: ``NIBABEL_EXTENSIONS``/``SCAN_EXTENSIONS`` and
``scan_stem`` (the napari plugin, psc-eval, psc-view and training all use these).

Validation: ``read_scan`` is the one place a scan is checked, before any work
(``validate_scan``): one 3-D volume of real, finite numbers, not empty or constant, on a
non-degenerate grid (finite, non-zero voxel sizes, independent axes) at least
``MIN_EXTENT_MM`` across along every axis, from a header nibabel did not have to
repair. Each refusal is one ``InputError`` sentence naming the file.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import voxel_sizes

from psc.utils.errors import InputError
from psc.utils.files import atomic_write

NIBABEL_EXTENSIONS = (".nii.gz", ".nii", ".mgz", ".mgh")
SITK_EXTENSIONS = (".nrrd", ".nhdr", ".mha", ".mhd")
SCAN_EXTENSIONS = NIBABEL_EXTENSIONS + SITK_EXTENSIONS
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Smallest field of view (mm, along each voxel axis) a scan must span. A newborn's brain
# is ~90 mm long, an adult's ~170 mm; the floor is set far below both on purpose, so that
# a scan cropped to the brain, a thick slab or a synthetic test volume (24-30 mm) passes,
# while a thumbnail, a patch or a header in the wrong unit (voxel sizes in cm or m) is
# refused instead of being "segmented" into noise.
MIN_EXTENT_MM = 20.0


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

    @property
    def voxel_sizes(self) -> tuple[float, ...]:
        """mm along each voxel axis (the affine's column lengths)."""
        return tuple(float(v) for v in voxel_sizes(self.affine))


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


def read_scan(path: str | Path, allow_empty: bool = False, labels: bool = False) -> Scan:
    """Read one 3-D scan and validate it (``validate_scan``); a trailing singleton 4th
    axis is dropped (IBSR files have one). ``labels``: a label map or mask, not an
    image, so a constant map (one class everywhere, a mask of the whole grid) and a small
    one pass. ``allow_empty``: an all-zero volume passes too (a label map that found no
    tissue is still a valid thing to score)."""
    path = Path(path)
    try:  # only a label map may be empty
        return validate_scan(_read(path), allow_empty=allow_empty, labels=labels or allow_empty)
    except InputError as error:
        raise InputError(f"{path}: {error}") from None


class _Repairs(logging.Handler):
    """Collects what nibabel's header checks log while they fix a header on load
    (``pixdim[1,2,3] should be non-zero; setting 0 dims to 1``...), instead of letting
    nibabel print it on stderr."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _load_nibabel(path: Path):
    """``(image, array)``; refuses a header nibabel had to repair. Only the repairs
    nibabel itself reports (logged at WARNING or above: zero or negative voxel sizes,
    a wrong header size, invalid qform/sform codes...) are refused: each means the
    geometry psc would use is a guess. What nibabel fixes silently is harmless and
    passes: a bitpix that disagrees with the datatype (the datatype decides), a scale
    slope of 0, NaN or inf (the standard: no scaling), a qfac other than -1 (taken as 1,
    per the standard); what it cannot fix (a header too short, an invalid intercept, an
    impossible quaternion) is "not a readable image". Numeric warnings (e.g. a NaN
    affine) are silenced here and refused by ``validate_scan`` with a sentence of its
    own."""
    from nibabel.imageglobals import logger

    repairs = _Repairs()
    handlers = list(logger.handlers)
    for handler in handlers:
        logger.removeHandler(handler)
    logger.addHandler(repairs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                image = nib.load(str(path))
                array = np.asanyarray(image.dataobj)
                affine = np.asarray(image.affine, dtype=np.float64)
            except Exception as error:  # nibabel raises many types for corrupt files
                raise InputError(f"is not a readable image ({type(error).__name__}: {str(error)[:120]})") from None
    finally:
        logger.removeHandler(repairs)
        for handler in handlers:
            logger.addHandler(handler)
    if repairs.messages:
        raise InputError(f"has a broken header that nibabel would repair by guessing ({repairs.messages[0]}); "
                         "fix the header (e.g. rewrite it with the scanner's geometry)")
    return image, array, affine


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
        image, array, affine = _load_nibabel(path)
        if isinstance(image.header, nib.Nifti1Header):
            header = image.header
    return Scan(path, array, np.asarray(affine, dtype=np.float64), header)


def validate_scan(scan: Scan, allow_empty: bool = False, labels: bool = False) -> Scan:
    """The checks every scan passes before any work, in this order, each refusal one
    sentence (without the path, which ``read_scan`` puts in front): the shape (3-D, a
    trailing singleton axis dropped; not a 4-D series, not a single slice), real
    numbers (not complex, not NaN/inf), content (not all zero unless ``allow_empty``;
    not constant unless ``labels``), the grid (finite affine, finite non-zero voxel
    sizes, independent axes) and, unless ``labels``, a field of view of at least
    ``MIN_EXTENT_MM`` along every axis."""
    array = scan.array
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 4:
        raise InputError(f"is a 4-D series of {array.shape[3]} volumes; psc segments one 3-D volume")
    if array.ndim != 3:
        raise InputError(f"is {array.ndim}-D with shape {tuple(array.shape)}; psc segments 3-D volumes")
    if min(array.shape) < 2:
        raise InputError(f"is a single slice (shape {tuple(array.shape)}); psc segments 3-D volumes")
    if np.iscomplexobj(array):
        raise InputError(f"has complex voxels ({array.dtype}); psc needs real intensities "
                         "(save the magnitude image)")
    if not np.issubdtype(array.dtype, np.number):
        raise InputError(f"has non-numeric voxels ({array.dtype})")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError("contains NaN or infinite voxels")
    if not allow_empty and not np.any(array):
        raise InputError("is empty (every voxel is zero)")
    if not labels and array.size and array.min() == array.max():
        raise InputError(f"is constant (every voxel is {array.flat[0]}); there is no image to segment")
    affine = scan.affine
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise InputError("has a degenerate affine (NaN or infinite entries); its voxel sizes and orientation "
                         "are unknown")
    zooms = voxel_sizes(affine)
    if not (zooms > 1e-6).all():
        raise InputError(f"has a degenerate affine (voxel sizes {_mm(zooms)} mm); every voxel size must be "
                         "positive")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(zooms)):
        raise InputError("has a degenerate affine (singular: its voxel axes are not independent)")
    extent = np.array(array.shape) * zooms
    if not labels and (extent < MIN_EXTENT_MM).any():
        raise InputError(f"is too small to hold a brain ({_mm(extent)} mm field of view, shape "
                         f"{tuple(array.shape)}; at least {MIN_EXTENT_MM:g} mm along every axis)")
    scan.array = array
    return scan


def _mm(values) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


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
