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


def divide_by_dtype_max(raw: np.ndarray) -> np.ndarray:
    """Raw intensities to [0, 1] by the dtype's range (EM detectors fill it); float
    data are taken as already in [0, 1]."""
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)
    return raw.astype(np.float32)


NORMALISATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "divide-by-dtype-max": divide_by_dtype_max,
}
DEFAULT_NORMALISATION = "divide-by-dtype-max"


def normaliser(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The input transform named ``name`` (a card's ``normalisation``)."""
    try:
        return NORMALISATIONS[name]
    except KeyError:
        raise WeightsError(f"the model card names the EM normalisation {name!r}, which this "
                           f"version of psc does not know ({', '.join(NORMALISATIONS)})") from None
