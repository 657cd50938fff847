"""Synthetic EM volumes: exact labels, dark membranes, determinism, any shape."""

from __future__ import annotations

import numpy as np
import pytest

from psc.pipelines.em import synthetic
from psc.pipelines.em.synthetic import boundary_mask, make_em_volume

MEMBRANE_GREY = round(synthetic.MEMBRANE * 255)


@pytest.mark.parametrize("shape", [(32, 32, 32), (20, 48, 40)])
def test_shapes_dtypes_and_consecutive_labels_covering_every_voxel(shape):
    raw, labels = make_em_volume(shape, cell_size=8)
    assert raw.shape == labels.shape == shape
    assert raw.dtype == np.uint8 and labels.dtype == np.uint64
    assert labels.min() == 1  # no background: every voxel belongs to a cell
    np.testing.assert_array_equal(np.unique(labels), np.arange(1, labels.max() + 1))


@pytest.mark.parametrize("shape, cell_size", [((64, 64, 64), 16), ((32, 32, 32), 8), ((20, 48, 40), 10)])
def test_cell_count_follows_cell_size(shape, cell_size):
    _, labels = make_em_volume(shape, cell_size=cell_size)
    expected = np.prod(shape) / cell_size**3
    assert expected / 2 <= labels.max() <= expected * 2


def test_same_seed_same_volume_other_seed_other_volume():
    raw, labels = make_em_volume((24, 24, 24), cell_size=8, seed=3)
    raw_again, labels_again = make_em_volume((24, 24, 24), cell_size=8, seed=3)
    np.testing.assert_array_equal(raw, raw_again)
    np.testing.assert_array_equal(labels, labels_again)
    raw_other, labels_other = make_em_volume((24, 24, 24), cell_size=8, seed=4)
    assert not np.array_equal(raw, raw_other)
    assert not np.array_equal(labels, labels_other)


def test_membranes_are_darker_than_cell_interiors():
    raw, labels = make_em_volume()  # defaults: blurred and noisy
    membrane = raw[boundary_mask(labels)].mean()
    interior = raw[~boundary_mask(labels, width=3)].mean()
    assert interior - membrane > 60  # grey levels, out of 255


@pytest.mark.parametrize("membrane_width", [2, 4])
def test_without_blur_and_noise_membranes_are_exactly_the_boundary_voxels(membrane_width):
    raw, labels = make_em_volume((24, 24, 24), cell_size=8, membrane_width=membrane_width, blur=0, noise=0)
    np.testing.assert_array_equal(raw == MEMBRANE_GREY, boundary_mask(labels, membrane_width // 2))
    assert raw[raw != MEMBRANE_GREY].min() > 150  # cytoplasm ~0.75 * 255


def test_labels_do_not_depend_on_the_query_chunk(monkeypatch):
    _, labels = make_em_volume((12, 20, 16), cell_size=6)
    monkeypatch.setattr(synthetic, "CHUNK_VOXELS", 100)  # less than a plane: one z at a time
    _, chunked = make_em_volume((12, 20, 16), cell_size=6)
    np.testing.assert_array_equal(labels, chunked)


def test_boundary_mask_marks_both_sides_out_to_width():
    labels = np.array([1, 1, 1, 2, 2, 2]).reshape(1, 1, 6)
    assert boundary_mask(labels).ravel().tolist() == [0, 0, 1, 1, 0, 0]
    assert boundary_mask(labels, width=2).ravel().tolist() == [0, 1, 1, 1, 1, 0]
    assert not boundary_mask(np.ones((3, 4, 5))).any()
