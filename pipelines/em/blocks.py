"""Walking a volume block by block, so memory is bounded by a block, never the volume:
the one block iteration of scoring (``psc-eval``, the napari Score widget), of copying
layers to zarr (the napari writer and Segment widget) and of anything else that reads or
writes an array a piece at a time. Works on numpy, zarr and dask arrays alike."""

from __future__ import annotations

import itertools
from typing import Any, Iterator, Sequence


def chunk_shape(data: Any, default: Sequence[int]) -> tuple[int, ...]:
    """The block shape that follows ``data``'s storage: its chunks (zarr: a shape; dask:
    the first chunk along each axis), else ``default``."""
    chunks = getattr(data, "chunks", None)
    if not chunks:
        return tuple(int(d) for d in default)
    return tuple(int(c[0]) if isinstance(c, tuple) else int(c) for c in chunks)


def blocks(shape: Sequence[int], block_shape: Sequence[int]) -> Iterator[tuple[slice, ...]]:
    """Non-overlapping blocks covering ``shape`` in C order, the last along each axis
    clipped to it; axes beyond ``block_shape`` are taken whole."""
    shape = tuple(int(s) for s in shape)
    steps = [max(1, int(b)) for b in block_shape][:len(shape)]
    steps += list(shape[len(steps):])
    for starts in itertools.product(*(range(0, n, step) for n, step in zip(shape, steps))):
        yield tuple(slice(start, min(start + step, n)) for start, step, n in zip(starts, steps, shape))


def slabs(shape: Sequence[int], data: Any = None, default: int = 32) -> Iterator[slice]:
    """Slabs along axis 0, as thick as ``data``'s chunks along it (else ``default``)."""
    step = chunk_shape(data, (default,))[0]
    for block in blocks(tuple(shape)[:1], (step,)):
        yield block[0]
