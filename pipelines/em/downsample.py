"""2x2x2 downsampling of a run's images: the resolution levels 1..L that let napari and
neuroglancer open a volume of hundreds of GB zoomed out without reading level 0.

Two reductions, one per kind of image, both over the spatial axes (z, y, x) only; a
leading channel axis (the affinities' 3) is kept as it is:

- :func:`downsample_mean` (images: the uint8 affinities): the mean of each 2x2x2 cell,
  rounded to the nearest integer (halves up: ``floor(mean + 1/2)``, in integer
  arithmetic, so no float rounding differs between machines);
- :func:`downsample_mode` (labels: fragments, segmentation): the id that occurs most
  often in the cell. A mean of ids is meaningless (it invents ids); the mode keeps ids
  that exist. Ties (2+2+2+2, 4+4, 3+3+1+1 ...) go to the **smallest nonzero id among the
  tied**; 0 is kept only when it wins outright (more voxels than any other id) or the cell
  is all 0. Why: 0 is "no object" (background, unlabelled), and at a coarser level a thin
  object that holds half a cell should stay visible rather than vanish into background;
  among nonzero ids the smallest is an arbitrary but fixed choice that depends only on
  the cell's *set* of values, not on where they sit in it, so a block computes the same
  cell as the whole volume does.

Odd sizes: the last cell along an axis of odd length is partial (1 voxel deep instead of
2) and reduces over the voxels it has. Both functions pad by repeating the edge voxel,
which gives every present voxel of a partial cell the same weight (the same factor 2 per
short axis), so the mean and the counts' order (hence the mode and its ties) are those of
the present voxels alone. A level's shape is therefore ``ceil(shape / 2)`` per axis.

Level k is computed from level k-1 (not from a 2^k cube of level 0): what the pipeline
writes blockwise and what :func:`pyramid` computes on a whole array in memory are the
same arrays, which the tests check.
"""

from __future__ import annotations

import numpy as np

FACTOR = 2  # per spatial axis


def level_shape(shape, levels: int = 1) -> tuple[int, ...]:
    """The spatial shape after ``levels`` halvings: ``ceil(s / 2)`` each time."""
    shape = tuple(int(s) for s in shape)
    for _ in range(levels):
        shape = tuple(-(-s // FACTOR) for s in shape)
    return shape


def _cells(data: np.ndarray) -> np.ndarray:
    """``data`` (..., z, y, x) as (..., Z, Y, X, 8): the 8 voxels of each 2x2x2 cell last,
    odd axes padded by repeating the edge voxel (module doc: partial cells)."""
    if data.ndim < 3:
        raise ValueError(f"expected (..., z, y, x), got shape {data.shape}")
    spatial = data.shape[-3:]
    pad = [(0, 0)] * (data.ndim - 3) + [(0, s % FACTOR) for s in spatial]
    if any(after for _, after in pad):
        data = np.pad(data, pad, mode="edge")
    lead = data.shape[:-3]
    z, y, x = (s // FACTOR for s in data.shape[-3:])
    cells = data.reshape(*lead, z, FACTOR, y, FACTOR, x, FACTOR)
    n = len(lead)
    # (..., z, 2, y, 2, x, 2) -> (..., z, y, x, 2, 2, 2)
    order = list(range(n)) + [n, n + 2, n + 4, n + 1, n + 3, n + 5]
    return cells.transpose(order).reshape(*lead, z, y, x, FACTOR ** 3)


def downsample_mean(data: np.ndarray) -> np.ndarray:
    """The rounded mean of each 2x2x2 cell (halves up), in ``data``'s integer dtype;
    float data get the plain mean. Channel axes before (z, y, x) are kept."""
    data = np.asarray(data)
    cells = _cells(data)
    count = cells.shape[-1]
    if np.issubdtype(data.dtype, np.floating):
        return cells.mean(axis=-1, dtype=np.float64).astype(data.dtype)
    if not np.issubdtype(data.dtype, np.integer):
        raise TypeError(f"downsample_mean: expected an integer or float array, got {data.dtype}")
    total = cells.sum(axis=-1, dtype=np.int64 if np.issubdtype(data.dtype, np.signedinteger) else np.uint64)
    # floor(total / count + 1/2) = (2 total + count) // (2 count), exact in integers
    return ((total * 2 + count) // (2 * count)).astype(data.dtype)


def downsample_mode(labels: np.ndarray) -> np.ndarray:
    """The most frequent id of each 2x2x2 cell; ties to the smallest nonzero id among the
    tied, 0 only when it wins outright or the cell is all 0 (module doc: why).

    Vectorised: the cell's 8 values sorted, each value's count within its cell from an
    8x8 comparison, and one argmax over a score that ranks a higher count first and, at
    equal count, a nonzero id before 0; argmax takes the first of equal scores, which in
    sorted order is the smallest id."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"downsample_mode: expected integer labels, got {labels.dtype}")
    cells = np.sort(_cells(labels), axis=-1)
    counts = (cells[..., :, None] == cells[..., None, :]).sum(axis=-1, dtype=np.int16)
    score = counts * 2 - (cells == 0)  # count c nonzero (2c) > count c zero (2c-1) > count c-1 (2c-2)
    best = np.argmax(score, axis=-1)
    return np.take_along_axis(cells, best[..., None], axis=-1)[..., 0]


def downsample(data: np.ndarray, labels: bool) -> np.ndarray:
    """One level down: :func:`downsample_mode` for label images, :func:`downsample_mean` else."""
    return downsample_mode(data) if labels else downsample_mean(data)


def pyramid(data: np.ndarray, levels: int, labels: bool) -> list[np.ndarray]:
    """Levels 0..``levels`` of a whole array in memory (level 0 is ``data``): the reference
    the blockwise stage is tested against, and what the napari benchmark writes."""
    out = [np.asarray(data)]
    for _ in range(levels):
        out.append(downsample(out[-1], labels))
    return out


MIN_CHUNK = 16  # voxels per axis: the smallest chunk a level gets (stages.Downsample)


def level_count(block_size, shape, min_chunk: int = MIN_CHUNK) -> int:
    """How many levels below level 0 a run gets (L): halvings while, on every axis, the
    block (the chunk of level 0, so each block writes whole chunks of every level) halves
    to an integer of at least ``min_chunk`` voxels, and the volume at the level above
    still has 2 voxels or more to halve.

    Why tie the levels to the block: each block of the level-0 grid writes its own region
    of every level, so no two blocks (workers) ever write one chunk and the stage needs
    no second pass nor locks; the price is that the coarsest level's chunks are
    ``block / 2^L``. With the default 128^3 blocks that is L = 3 (chunks of 16^3 at level
    3, 1/512 of the voxels): a 100 GB volume opens with a 200 MB level. More levels for a
    larger volume would need a second, coarser pass (a task whose blocks are 2^L level-0
    blocks, reading level L and writing L+1 ...), or larger blocks; neither is built."""
    block_size = tuple(int(b) for b in block_size)
    shape = tuple(int(s) for s in shape)
    levels = 0
    while True:
        factor = FACTOR ** (levels + 1)
        above = level_shape(shape, levels)
        if any(b % factor or b // factor < min_chunk for b in block_size) or any(s < 2 for s in above):
            return levels
        levels += 1
