"""What an EM raw's intensities are, measured once when a run is prepared, from sampled
chunks: the refusals (not an image at all), the warnings (an image the model will
probably get wrong), and the input range the predict stage scales the raw by.

Why measured and not read from the dtype: a detector's 12 bits stored in uint16, a
uint16 volume holding 0..255, or float32 holding 0..255 all fill a small corner of
their dtype's range. Divided by the dtype's maximum they reach the network as a nearly
black volume, and the run ends with one segment for the whole volume and exit 0. Scaled
by the range their values actually use they reach it as the uint8 volumes it learned
from do.

The sample is ``SAMPLED_CHUNKS`` chunks evenly spaced over the chunk grid (the chunks
the fingerprint hashes among them), at most ``VOXELS_PER_CHUNK`` voxels of each: a few
MB read, whatever the volume's size. Only when every sampled voxel holds one value is
the whole volume read, to tell a constant volume (refused) from a sparse one.
"""

from __future__ import annotations

import math

import numpy as np

from psc.utils.errors import InputError

from .normalise import HIGH_KEY, HIGH_PERCENTILE, LOW_KEY, LOW_PERCENTILE, QUANTILES, QUANTILES_KEY
from .volumes import Volume, sampled_chunks

SAMPLED_CHUNKS = 32
VOXELS_PER_CHUNK = 1 << 18
# the fraction of the input range the middle 99.8 % of the sampled voxels must span:
# FIB-25's span 0.5-0.7 of it; below this the contrast is too low to trust the affinities
MIN_SPAN = 0.1
# fewer distinct values than this among the sampled voxels of an integer raw: labels or a
# mask, not an image (an 8-bit EM image of a few chunks holds well over a hundred)
MIN_DISTINCT = 16
RAW_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16))  # psc-convert's raw dtypes, besides floats


def _sample(volume: Volume) -> np.ndarray:
    values = []
    for _, region in sampled_chunks(volume.array, SAMPLED_CHUNKS):
        try:
            data = np.asarray(volume.array[region]).ravel()
        except Exception:  # a corrupt chunk: predict names its blocks, as the fingerprint leaves it
            continue
        step = max(1, data.size // VOXELS_PER_CHUNK)
        values.append(data[::step])
    return np.concatenate(values) if values else np.zeros(0, volume.array.dtype)


def _whole_range(volume: Volume) -> tuple[float, float]:
    """Min and max over every chunk (only for a sample that holds a single value)."""
    lo, hi = math.inf, -math.inf
    for _, region in sampled_chunks(volume.array, math.prod(volume.array.cdata_shape)):
        try:
            data = np.asarray(volume.array[region])
        except Exception:  # as in _sample
            continue
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            raise InputError("contains NaN or infinite voxels")
        lo, hi = min(lo, float(data.min())), max(hi, float(data.max()))
    return (lo, hi) if lo <= hi else (0.0, 0.0)


def _bits_range(top: float) -> float:
    """The largest value of the fewest bits (at least 8) that hold ``top``: 255 for
    0..255 data, 4095 for a 12-bit detector, 65535 for full 16-bit data."""
    return float(2 ** max(8, int(math.ceil(math.log2(max(top, 1.0) + 1)))) - 1)


def input_range(low: float, high: float, dtype: np.dtype) -> tuple[float, float]:
    """``(offset, scale)``: the network sees ``(raw - offset) / scale``. Integers and
    non-negative floats beyond 1 are divided by the range of the bits they use, so that
    uint8 data keep exactly the dtype scaling the models were trained with; floats in
    [0, 1] are taken as they are; floats with negative values (e.g. z-scored) are mapped
    by their sampled ``low`` and ``high``."""
    if dtype.kind == "f":
        if low >= 0 and high <= 1:
            return 0.0, 1.0
        if low < 0:
            return float(low), float(max(high - low, np.finfo(np.float32).tiny))
    return 0.0, _bits_range(high)


def measure(volume: Volume, name: str = "raw") -> tuple[dict, list[str]]:
    """The intensity record of ``volume`` (stored with the run's settings) and the
    warnings it calls for; raises ``InputError`` for what is not an image: a label or
    other integer dtype, NaN or infinite voxels, a constant volume (all zero included)."""
    dtype = np.dtype(volume.array.dtype)
    if dtype.kind == "b" or (dtype.kind in "iu" and dtype not in RAW_DTYPES):
        raise InputError(f"{name} has dtype {dtype}, which psc takes for a label array; psc-segment needs the "
                         "raw image (uint8, uint16 or float)")
    if dtype.kind not in "uf":
        raise InputError(f"{name} has dtype {dtype}; psc-segment needs the raw image (uint8, uint16 or float)")
    sample = _sample(volume)
    if dtype.kind == "f" and not np.isfinite(sample).all():
        raise InputError(f"{name} contains NaN or infinite voxels (psc-convert refuses them too): fix the source")
    lo, hi = (float(sample.min()), float(sample.max())) if sample.size else (0.0, 0.0)
    if lo == hi:
        try:
            lo, hi = _whole_range(volume)
        except InputError as error:
            raise InputError(f"{name} {error}") from None
        if lo == hi:
            raise InputError(f"{name} is constant (every voxel is {lo:g}); there is no image to segment")
    low, high, p_low, p_high = (float(v) for v in np.percentile(sample, [0.1, 99.9, LOW_PERCENTILE, HIGH_PERCENTILE]))
    offset, scale = input_range(lo, hi, dtype)
    span = (high - low) / scale
    warnings = []
    distinct = int(np.unique(sample).size)
    if dtype.kind in "iu" and distinct < MIN_DISTINCT:
        warnings.append(f"{name} holds only {distinct} distinct values in {SAMPLED_CHUNKS} sampled chunks: "
                        "is it a label array or a mask rather than the image?")
    if span < MIN_SPAN:
        warnings.append(f"{name}'s intensities span {100 * span:.1f} % of the input range ({low:g} to {high:g} "
                        f"scaled by {scale:g}): contrast this low is likely to merge segments")
    record = {"dtype": str(dtype), "min": lo, "max": hi, "p0.1": low, "p99.9": high, LOW_KEY: p_low, HIGH_KEY: p_high, "distinct": distinct,
              "sampled_voxels": int(sample.size), "offset": offset, "scale": scale,
              QUANTILES_KEY: [float(v) for v in np.percentile(sample, np.linspace(0, 100, QUANTILES))]}
    return record, warnings
