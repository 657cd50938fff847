"""EM segmentation scores against independent references (waterz, scikit-image), and
blockwise accumulation against the whole-volume table."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import waterz
from skimage.metrics import adapted_rand_error, variation_of_information

from psc.pipelines.em.metrics import Contingency, evaluate, scores
from psc.utils.errors import InputError

SHAPE = (30, 33, 29)


def cubes(shape=SHAPE, size=8):
    """Ground truth of cubic objects 1..N, with a few unlabelled (0) planes between them."""
    z, y, x = np.indices(shape)
    gt = (z // size) * 100 + (y // size) * 10 + x // size + 1
    gt[(z % size == 0) | (y % (2 * size) == 0)] = 0
    return gt.astype(np.uint64)


def noisy(gt, seed, keep=0.8, n_labels=40):
    """gt with a fraction of voxels relabelled at random (splits and merges at once)."""
    rng = np.random.default_rng(seed)
    return np.where(rng.random(gt.shape) < keep, gt, rng.integers(0, n_labels, gt.shape)).astype(np.uint64)


def assert_matches_waterz(ours, seg, gt):
    theirs = waterz.evaluate(np.ascontiguousarray(seg, np.uint64), np.ascontiguousarray(gt, np.uint64))
    for key in ("voi_split", "voi_merge", "rand_split", "rand_merge"):
        assert ours[key] == pytest.approx(theirs[key], abs=1e-9), key


def assert_matches_skimage_vi(ours, seg, gt):
    # variation_of_information(image0, image1) returns [H(image1|image0), H(image0|image1)],
    # so with the ground truth first: [H(seg|gt), H(gt|seg)] = [split, merge].
    split, merge = variation_of_information(gt, seg, ignore_labels=[0])
    assert ours["voi_split"] == pytest.approx(split, abs=1e-9)
    assert ours["voi_merge"] == pytest.approx(merge, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_segmentation_agrees_with_waterz_and_skimage(seed):
    gt = cubes()
    seg = noisy(gt, seed)
    ours = evaluate(seg, gt)
    assert_matches_waterz(ours, seg, gt)
    assert_matches_skimage_vi(ours, seg, gt)
    assert ours["voi"] == pytest.approx(ours["voi_split"] + ours["voi_merge"], abs=1e-12)
    rs, rm = ours["rand_split"], ours["rand_merge"]
    assert ours["adapted_rand_error"] == pytest.approx(1 - 2 * rs * rm / (rs + rm), abs=1e-12)
    assert 0 < ours["adapted_rand_error"] < 1 and ours["voi_split"] > 0 and ours["voi_merge"] > 0


def test_oversegmentation_has_no_merge_error():
    gt = cubes()
    seg = gt * 2 + (np.indices(gt.shape)[2] % 4 < 2)  # every object cut in slabs
    ours = evaluate(seg, gt)
    assert ours["voi_merge"] == 0 and ours["rand_merge"] == 1
    assert ours["voi_split"] > 0.5 and ours["rand_split"] < 0.9
    assert_matches_waterz(ours, seg, gt)
    assert_matches_skimage_vi(ours, seg, gt)


def test_merge_has_no_split_error_and_segment_zero_is_a_label():
    gt = cubes()
    seg = gt // 4  # groups of objects merged; objects 1..3 fall into segment 0
    ours = evaluate(seg, gt)
    assert ours["voi_split"] == 0 and ours["rand_split"] == 1
    assert ours["voi_merge"] > 0.5 and ours["rand_merge"] < 0.9
    assert_matches_waterz(ours, seg, gt)
    assert_matches_skimage_vi(ours, seg, gt)


def test_identical_segmentation_is_perfect():
    gt = cubes()
    ours = evaluate(gt, gt)
    assert ours == {"voi_split": 0, "voi_merge": 0, "voi": 0, "rand_split": 1, "rand_merge": 1,
                    "adapted_rand_error": 0}
    # Relabelling the segments changes nothing.
    assert evaluate(gt * 7 + 3, gt) == ours


def test_adapted_rand_error_is_close_to_skimage_pair_count_version():
    # skimage counts pairs of distinct voxels (p^2 - p): the same score up to ~1/object size.
    gt = cubes(size=10)
    seg = noisy(gt, 5, keep=0.9)
    are, _, _ = adapted_rand_error(gt, seg, ignore_labels=(0,))
    assert evaluate(seg, gt)["adapted_rand_error"] == pytest.approx(are, abs=2e-3)


def blocks(shape, step=(7, 11, 13)):
    """Non-overlapping, unevenly sized blocks covering the volume."""
    starts = [range(0, s, d) for s, d in zip(shape, step)]
    return [tuple(slice(b, b + d) for b, d in zip(start, step)) for start in itertools.product(*starts)]


def test_blockwise_and_merged_tables_equal_the_whole_volume():
    gt = cubes()
    seg = noisy(gt, 3)
    whole = Contingency()
    whole.add(seg, gt)

    one, first, second = Contingency(), Contingency(), Contingency()
    for i, block in enumerate(blocks(gt.shape)):
        one.add(seg[block], gt[block])
        (first if i % 2 else second).add(seg[block], gt[block])
    first.merge(second)

    expected = whole.to_arrays()
    for table in (one, first):
        for got, want in zip(table.to_arrays(), expected):
            np.testing.assert_array_equal(got, want)
        for key, value in scores(table).items():
            assert value == pytest.approx(scores(whole)[key], abs=1e-12)
    # scores() also takes the arrays, as saved by a worker.
    assert scores(one.to_arrays()) == scores(whole)


def test_to_arrays_sums_counts_per_pair():
    table = Contingency()
    table.add(np.array([[[5, 5, 0, 5]]]), np.array([[[1, 1, 2, 0]]]))
    table.add(np.array([[[5]]]), np.array([[[2]]]))
    seg, gt, counts = table.to_arrays()
    assert [(int(s), int(g), int(c)) for s, g, c in zip(seg, gt, counts)] == [(0, 2, 1), (5, 1, 2), (5, 2, 1)]
    assert seg.dtype == gt.dtype == counts.dtype == np.uint64


def test_ground_truth_zero_is_ignored():
    gt = cubes()
    seg = noisy(gt, 4)
    unlabelled = gt == 0
    assert unlabelled.any()
    relabelled = seg.copy()
    relabelled[unlabelled] = np.random.default_rng(0).integers(1000, 2000, unlabelled.sum())
    assert evaluate(relabelled, gt) == evaluate(seg, gt)
    assert_matches_skimage_vi(evaluate(relabelled, gt), relabelled, gt)
    # Only the labelled voxels are counted.
    table = Contingency()
    table.add(seg, gt)
    assert int(table.to_arrays()[2].sum()) == int((~unlabelled).sum())


def test_uint64_labels_near_the_top_of_the_range():
    gt = cubes()
    seg = noisy(gt, 6)
    top = np.iinfo(np.uint64).max
    big_seg = np.uint64(top) - seg  # distinct ids spread over [2**64 - 40, 2**64 - 1]
    big_gt = np.where(gt == 0, 0, gt + np.uint64(2**63)).astype(np.uint64)
    ours = evaluate(big_seg, big_gt)
    small = evaluate(seg, gt)
    for key in ours:
        assert ours[key] == pytest.approx(small[key], abs=1e-12)
    assert_matches_waterz(ours, big_seg, big_gt)

    table = Contingency()
    table.add(big_seg, big_gt)
    seg_ids, gt_ids, _ = table.to_arrays()
    assert set(seg_ids.tolist()) == set(big_seg[gt != 0].tolist())
    assert set(gt_ids.tolist()) == set(big_gt[gt != 0].tolist())


def test_pairs_that_would_collide_in_a_packed_key_stay_apart():
    # seg * 2**32 + gt gives 2**32 + 1 for both pairs.
    table = Contingency()
    table.add(np.array([0, 1], dtype=np.uint64), np.array([2**32 + 1, 1], dtype=np.uint64))
    assert table.to_arrays()[2].tolist() == [1, 1]


def test_mixed_dtypes_and_bad_input():
    gt = cubes()
    seg = noisy(gt, 7)
    assert evaluate(seg.astype(np.uint16), gt.astype(np.int32)) == evaluate(seg, gt)
    with pytest.raises(InputError):
        evaluate(seg[:-1], gt)
    with pytest.raises(InputError):
        evaluate(seg, np.zeros_like(gt))
