"""EM raw intensities -> the network's input range, by the name on the model card.

The card's ``normalisation`` names the transform its network was trained with; the
predict stage and training both look it up here, so weights trained with another
transform keep working when a new one is added, and a card naming a transform this
version does not know is refused before any block runs.

Each transform takes the raw and the volume's *intensity record* (``intensity.measure``:
measured once from sampled chunks of the whole volume, stored in a run's settings), so a
block is scaled by numbers of its volume, never of the block itself: blocks of one volume
are scaled alike and the blockwise result equals the whole-volume one.

- ``divide-by-dtype-max``: by the range of the bits the data use (255 for 8-bit data).
  Keeps each volume's contrast as recorded, so a model trained on one sample's contrast
  sees another sample's as something new (psc's models before issue 15).
- ``robust-percentiles``: the volume's 1st percentile to 0 and its 99th to 1 (Cicek et
  al. 2016 and nnU-Net clip and scale by percentiles for the same reason): a low-contrast
  sample (NeuroProof's intensity std is 34 against FIB-25's 54) reaches the network with
  the contrast of a high-contrast one, and a volume's brightness offset disappears.
- ``histogram-equalisation``: each voxel to the fraction of the volume's voxels darker
  than it (the volume's cumulative histogram, from ``QUANTILES`` quantiles of the sampled
  chunks, linear between them). Global histogram equalisation, as connectomics pipelines
  equalise FIB-SEM stacks before training: two samples then share not only their range
  but their whole intensity distribution, so a nonlinear difference in contrast (a
  detector's gamma, a stain that darkens membranes more than cytoplasm) disappears too.
  CLAHE, the local variant, is not offered: its tiles are placed relative to the array it
  is given, so a block and the whole volume would be equalised differently and the
  blockwise result would depend on the block size.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from psc.models.weights import WeightsError
from psc.utils.errors import InputError

# the percentiles robust-percentiles maps to 0 and 1, stored by intensity.measure
LOW_PERCENTILE, HIGH_PERCENTILE = 1.0, 99.0
LOW_KEY, HIGH_KEY = f"p{LOW_PERCENTILE:g}", f"p{HIGH_PERCENTILE:g}"
# histogram-equalisation's cumulative histogram: this many evenly spaced quantiles, 0 to
# 100 %, stored by intensity.measure under QUANTILES_KEY (129: 1/128 of the voxels between
# two, finer than an 8-bit image's histogram bins over its used range)
QUANTILES = 129
QUANTILES_KEY = "quantiles"


def divide_by_dtype_max(raw: np.ndarray, intensity: dict | None = None) -> np.ndarray:
    """Raw intensities to [0, 1] by the dtype's range (an 8-bit detector fills it);
    float data are taken as already in [0, 1]. With the volume's ``intensity`` record,
    by its ``(offset, scale)``: the range of the bits the data use, so 12-bit data in
    uint16 or 0..255 in float32 reach the network as 8-bit data do. For uint8 data the
    two are the same."""
    if intensity:
        offset, scale = float(intensity["offset"]), float(intensity["scale"])
        return ((raw.astype(np.float32) - np.float32(offset)) / np.float32(scale)).astype(np.float32)
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)
    return raw.astype(np.float32)


def robust_percentiles(raw: np.ndarray, intensity: dict | None = None) -> np.ndarray:
    """``(raw - p1) / (p99 - p1)`` with the volume's percentiles from ``intensity``
    (required: percentiles of a block would scale each block differently)."""
    if not intensity or LOW_KEY not in intensity or HIGH_KEY not in intensity:
        raise InputError("robust-percentiles normalisation needs the volume's measured percentiles "
                         "(prepare the run again with this version of psc)")
    low, high = float(intensity[LOW_KEY]), float(intensity[HIGH_KEY])
    span = max(high - low, 1e-6)
    return ((raw.astype(np.float32) - np.float32(low)) / np.float32(span)).astype(np.float32)


def histogram_equalisation(raw: np.ndarray, intensity: dict | None = None) -> np.ndarray:
    """Each voxel to its position in the volume's cumulative histogram (0: darkest, 1:
    brightest), interpolated between the measured quantiles of ``intensity``
    (required, as for robust-percentiles). Equal quantiles (many voxels of one value in
    8-bit data) are merged into one point at their mean rank, so a value maps to the
    middle of the voxels that hold it."""
    if not intensity or QUANTILES_KEY not in intensity:
        raise InputError("histogram-equalisation normalisation needs the volume's measured quantiles "
                         "(prepare the run again with this version of psc)")
    values = np.asarray(intensity[QUANTILES_KEY], dtype=np.float64)
    ranks = np.linspace(0.0, 1.0, values.size)
    points, inverse = np.unique(values, return_inverse=True)
    mean_ranks = np.bincount(inverse, weights=ranks) / np.bincount(inverse)
    if points.size == 1:
        return np.full(raw.shape, 0.5, np.float32)
    return np.interp(raw.astype(np.float32), points, mean_ranks).astype(np.float32)


NORMALISATIONS: dict[str, Callable[..., np.ndarray]] = {
    "divide-by-dtype-max": divide_by_dtype_max,
    "robust-percentiles": robust_percentiles,
    "histogram-equalisation": histogram_equalisation,
}
DEFAULT_NORMALISATION = "robust-percentiles"


def normaliser(name: str, intensity: dict | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The input transform named ``name`` (a card's ``normalisation``), bound to the
    volume's measured ``intensity`` record (None or {}: a run prepared before psc
    measured its raw; only ``divide-by-dtype-max`` works without one)."""
    try:
        transform = NORMALISATIONS[name]
    except KeyError:
        raise WeightsError(f"the model card names the EM normalisation {name!r}, which this "
                           f"version of psc does not know ({', '.join(NORMALISATIONS)})") from None
    record = dict(intensity) if intensity else None
    return lambda raw: transform(raw, record)
