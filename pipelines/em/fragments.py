"""Fragments: an over-segmentation of one block, with ids unique across the volume.

A seeded watershed on the distance to the nearest boundary (boundary = mean affinity
below ``threshold``): seeds are the local maxima of that distance, so each compact piece
of neurite gets at least one, and the agglomeration stage merges what belongs together.
The block is computed with context and cropped to its write region, so neighbouring
blocks agree on how the data look near their shared face; the pieces of one neuron cut
by the face are separate fragments joined later across the face.

Ids are ``block_index << ID_BITS | local_id`` (local ids from 1, ``ID_BITS`` = 32):
unique without any coordination between workers, never 0, and below 2**63. The layout
lives here only: :func:`globalise` makes ids, :func:`fragment_block` reads their block.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed

ID_BITS = 32


def block_index(write_offset, block_shape, grid_shape) -> int:
    """Linear index of a block in the volume's block grid (C order)."""
    position = [int(o) // int(s) for o, s in zip(write_offset, block_shape)]
    return int(np.ravel_multi_index(position, [int(g) for g in grid_shape]))


def fragment_block(ids):
    """The block index of fragment ids: a Python int for one id (int or numpy scalar),
    a uint64 array for an array of ids."""
    if isinstance(ids, np.ndarray):
        return ids >> np.uint64(ID_BITS)
    return int(ids) >> ID_BITS


def watershed_fragments(affinities: np.ndarray, threshold: float = 0.5, seed_radius: int = 2) -> np.ndarray:
    """Fragments (uint64, consecutive from 1) of affinities in [0, 1], shape (3, z, y, x)."""
    inside = affinities.mean(axis=0) > threshold
    distance = ndimage.distance_transform_edt(inside)
    peaks = (distance == ndimage.maximum_filter(distance, size=2 * seed_radius + 1)) & inside
    seeds, count = ndimage.label(peaks)
    if count == 0:  # a block that is all boundary still gets one fragment
        return np.ones(inside.shape, dtype=np.uint64)
    # Boundary voxels go to the basin they are reached from first; the surface adds the
    # boundary strength so that ties inside the boundary split along its ridge.
    surface = (1.0 - affinities.mean(axis=0)) - distance / (distance.max() + 1.0)
    return watershed(surface, seeds).astype(np.uint64)


def globalise(fragments: np.ndarray, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relabel a cropped block's fragments to consecutive local ids, then to global ids.

    Returns (global fragments, their ids, their sizes in voxels)."""
    ids, inverse, sizes = np.unique(fragments, return_inverse=True, return_counts=True)
    local = inverse.reshape(fragments.shape).astype(np.uint64) + np.uint64(1)
    base = np.uint64(index) << np.uint64(ID_BITS)
    global_ids = base + np.arange(1, len(ids) + 1, dtype=np.uint64)
    return local + base, global_ids, sizes
