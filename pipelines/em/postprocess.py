"""The whole post-processing of an in-memory region: affinities -> fragments -> waterz
edges -> segmentation per threshold. Training validation uses it on its held-out region,
and tests use it as the single-block reference for the blockwise pipeline."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .agglomerate import SCORING, score_edges
from .fragments import globalise, watershed_fragments
from .graph import apply_lookup
from .merge import segments_at


def segment_affinities(affinities: np.ndarray, thresholds: Sequence[float],
                       fragment_threshold: float = 0.5, scoring: str = SCORING) -> dict[float, np.ndarray]:
    """Segmentations (uint64, consecutive ids) of float affinities (3, z, y, x) by threshold
    (``scoring``: waterz's scoring function, ``agglomerate.SCORING`` as the pipeline's)."""
    fragments, ids, _ = globalise(watershed_fragments(affinities, fragment_threshold), 0)
    edges = score_edges(affinities, fragments, scoring)
    u = np.array([e[0] for e in edges], dtype=np.uint64)
    v = np.array([e[1] for e in edges], dtype=np.uint64)
    scores = np.array([np.inf if e[3] is None else e[3] for e in edges], dtype=np.float64)
    return {float(t): apply_lookup(fragments, ids, segments_at(ids, u, v, scores, t)) for t in thresholds}
