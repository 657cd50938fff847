"""EM raw intensities -> the network's input range, by the name on the model card.

The card's ``normalisation`` names the transform its network was trained with; the
predict stage and training both look it up here, so weights trained with another
transform keep working when a new one is added, and a card naming a transform this
version does not know is refused before any block runs.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from psc.models.weights import WeightsError


def divide_by_dtype_max(raw: np.ndarray, input_range: tuple[float, float] | None = None) -> np.ndarray:
    """Raw intensities to [0, 1] by the dtype's range (an 8-bit detector fills it);
    float data are taken as already in [0, 1]. A run passes the ``input_range``
    ``(offset, scale)`` it measured from its raw (``intensity.measure``): the range of
    the bits the data use, so 12-bit data in uint16 or 0..255 in float32 reach the
    network as 8-bit data do. For uint8 data the two are the same."""
    if input_range is not None:
        offset, scale = input_range
        return ((raw.astype(np.float32) - np.float32(offset)) / np.float32(scale)).astype(np.float32)
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)
    return raw.astype(np.float32)


NORMALISATIONS: dict[str, Callable[..., np.ndarray]] = {
    "divide-by-dtype-max": divide_by_dtype_max,
}
DEFAULT_NORMALISATION = "divide-by-dtype-max"


def normaliser(name: str, input_range: tuple[float, float] | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """The input transform named ``name`` (a card's ``normalisation``), with the
    ``input_range`` a run measured from its raw (None: the dtype's)."""
    try:
        transform = NORMALISATIONS[name]
    except KeyError:
        raise WeightsError(f"the model card names the EM normalisation {name!r}, which this "
                           f"version of psc does not know ({', '.join(NORMALISATIONS)})") from None
    if input_range is None:
        return transform
    offset, scale = (float(v) for v in input_range)
    return lambda raw: transform(raw, (offset, scale))
