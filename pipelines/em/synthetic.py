"""Synthetic EM-like volumes with exact instance labels, for tests and demos at any size.

Cells are the 3D Voronoi regions of random seed points: convex, space-filling, and
touching along flat faces, like densely packed neurites in a crude way. The raw image
shows bright cytoplasm and dark membranes along the cell boundaries, blurred and noisy
like a real EM image, so that a boundary or affinity model has something to learn and
the true segmentation is known voxel for voxel.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation, gaussian_filter
from scipy.spatial import cKDTree

CYTOPLASM, CELL_VARIATION, MEMBRANE = 0.75, 0.05, 0.15
CHUNK_VOXELS = 2**20  # voxels labelled per nearest-seed query, to bound memory


def boundary_mask(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """True at voxels within ``width`` steps along the axes (city-block distance) of a
    voxel with another label; ``width=1`` marks both sides of every label change."""
    mask = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        here = [slice(None)] * labels.ndim
        there = [slice(None)] * labels.ndim
        here[axis], there[axis] = slice(None, -1), slice(1, None)
        change = labels[tuple(here)] != labels[tuple(there)]
        mask[tuple(here)] |= change
        mask[tuple(there)] |= change
    if width > 1:
        mask = binary_dilation(mask, iterations=width - 1)
    return mask


def _voronoi_labels(shape: tuple[int, ...], seeds: np.ndarray) -> np.ndarray:
    """Label of the nearest seed (1-based) for every voxel, queried a z-slab at a time."""
    tree = cKDTree(seeds)
    labels = np.empty(shape, dtype=np.uint64)
    plane = int(np.prod(shape[1:]))
    step = max(1, CHUNK_VOXELS // plane)
    rest = [np.arange(s) for s in shape[1:]]
    for z0 in range(0, shape[0], step):
        z = np.arange(z0, min(z0 + step, shape[0]))
        points = np.stack(np.meshgrid(z, *rest, indexing="ij"), axis=-1).reshape(-1, len(shape))
        _, nearest = tree.query(points)
        labels[z0:z0 + z.size] = (nearest + 1).reshape((z.size, *shape[1:]))
    return labels


def make_em_volume(
    shape: tuple[int, int, int] = (64, 64, 64),
    cell_size: float = 16,
    membrane_width: int = 2,
    blur: float = 1.0,
    noise: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A raw image (uint8) and its cell labels (uint64, 1..N consecutive, no background).

    There are about ``prod(shape) / cell_size**3`` cells, so that a cell is about
    ``cell_size`` voxels across. Membranes are only drawn in the raw image: they are the
    voxels within ``membrane_width // 2`` (at least 1) of another cell, so about
    ``membrane_width`` voxels thick, and in the labels they belong to their cells. The raw
    intensity is ~0.75 in cells (varying a little per cell) and 0.15 on membranes,
    Gaussian-blurred with sigma ``blur`` voxels, with Gaussian noise of std ``noise``
    added, clipped to [0, 1] and scaled to 0..255. The same ``seed`` gives the same volume.
    """
    shape = tuple(int(s) for s in shape)
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    n_cells = int(min(size, max(1, round(size / cell_size**3))))
    # Seeds on distinct voxels: each one is nearest to its own voxel, so no cell is empty
    # and the labels are exactly 1..n_cells.
    seeds = np.stack(np.unravel_index(rng.choice(size, n_cells, replace=False), shape), axis=-1)
    labels = _voronoi_labels(shape, seeds)

    brightness = rng.normal(CYTOPLASM, CELL_VARIATION, n_cells + 1).astype(np.float32)
    raw = brightness[labels]
    raw[boundary_mask(labels, max(1, membrane_width // 2))] = MEMBRANE
    if blur > 0:
        raw = gaussian_filter(raw, blur)
    raw += noise * rng.standard_normal(shape, dtype=np.float32)
    raw = np.round(np.clip(raw, 0.0, 1.0) * 255).astype(np.uint8)
    return raw, labels
