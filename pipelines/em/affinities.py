"""Nearest-neighbour affinities: the convention every EM stage shares.

Channel ``d`` (order z, y, x) at voxel ``p`` is the affinity between ``p`` and its
neighbour one step *back* along axis ``d`` (``p - e_d``): 1 = same object, 0 = boundary.
This is waterz's convention (``region_graph.hpp`` reads ``aff[d][p]`` for the pair
``p, p - e_d``), so predicted affinities go to waterz without shuffling. Along the first
slice of an axis the neighbour lies outside the volume; targets are 0 there and masked.
"""

from __future__ import annotations

import numpy as np

OFFSETS = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))
CHANNELS = ("z", "y", "x")


def long_range_offsets(distances: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """The nearest-neighbour offsets followed by ``(-d, 0, 0), (0, -d, 0), (0, 0, -d)`` for
    each distance: the channel order of a model trained with long-range affinities."""
    offsets = list(OFFSETS)
    for d in distances:
        offsets += [(-d, 0, 0), (0, -d, 0), (0, 0, -d)]
    return tuple(offsets)


def channel_names(offsets: tuple[tuple[int, int, int], ...]) -> dict[int, str]:
    """A model card's channel labels: 'affinity z', ..., 'affinity x at 9'."""
    names = {}
    for channel, offset in enumerate(offsets):
        axis = next(a for a in range(3) if offset[a])
        distance = -offset[axis]
        names[channel] = f"affinity {CHANNELS[axis]}" + (f" at {distance}" if distance > 1 else "")
    return names


def _shifted_pair(offset: tuple[int, int, int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Index of the voxels ``p`` that have a neighbour ``p + offset`` inside the array, and
    of those neighbours (offsets point back: every component <= 0)."""
    here, back = [], []
    for o in offset:
        d = -int(o)
        here.append(slice(d, None))
        back.append(slice(None, -d if d else None))
    return tuple(here), tuple(back)


def affinities_from_labels(labels: np.ndarray, background: int | None = 0,
                           offsets: tuple[tuple[int, int, int], ...] = OFFSETS) -> tuple[np.ndarray, np.ndarray]:
    """Target affinities and their mask from an instance labelling.

    Returns ``(affinities, mask)``, both float32 of shape ``(len(offsets), z, y, x)``
    (default: the three nearest-neighbour channels). An edge is 1 where both voxels carry
    the same object label. With ``background`` set (label 0 = boundary or unlabelled, as
    in FIB-25's ground truth), edges touching it are 0 and only edges *between two
    background voxels* are masked out: boundary voxels then teach the network to cut
    (boundary-aware), while the unknown inside of a thick boundary does not count.
    """
    labels = np.asarray(labels)
    affinities = np.zeros((len(offsets), *labels.shape), dtype=np.float32)
    mask = np.zeros((len(offsets), *labels.shape), dtype=np.float32)
    for channel, offset in enumerate(offsets):
        here, back = _shifted_pair(offset)
        a, b = labels[here], labels[back]
        same = a == b
        valid = np.ones_like(same)
        if background is not None:
            same &= a != background
            valid = (a != background) | (b != background)
        affinities[channel][here] = same
        mask[channel][here] = valid
    return affinities, mask


def known_pairs(known: np.ndarray, offsets: tuple[tuple[int, int, int], ...] = OFFSETS) -> np.ndarray:
    """(len(offsets), z, y, x) bool: both voxels of the edge are ``known``."""
    both = np.zeros((len(offsets), *known.shape), bool)
    for channel, offset in enumerate(offsets):
        here, back = _shifted_pair(offset)
        both[channel][here] = known[here] & known[back]
    return both


def balance_weights(affinities: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-voxel loss weights that give both classes of each channel equal total weight
    (boundaries are rare, ~10 % of edges), times the mask."""
    weights = np.zeros_like(affinities, dtype=np.float32)
    for channel in range(affinities.shape[0]):
        valid = mask[channel] > 0
        positive = valid & (affinities[channel] > 0.5)
        negative = valid & ~positive
        total = valid.sum()
        for part in (positive, negative):
            count = part.sum()
            if count:
                weights[channel][part] = total / (2.0 * count)
    return weights


def to_uint8(affinities: np.ndarray) -> np.ndarray:
    """Quantise [0, 1] affinities for storage (1/255 steps; waterz works on floats)."""
    return np.clip(np.rint(affinities * 255.0), 0, 255).astype(np.uint8)


def from_uint8(stored: np.ndarray) -> np.ndarray:
    return stored.astype(np.float32) / 255.0
