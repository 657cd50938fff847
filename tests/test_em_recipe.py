"""Issue 15's training recipe on real computations: long-range affinity targets against a
direct per-voxel reference, each augmentation's effect on raw and labels together, the
per-volume percentile normalisation (in training and through a blockwise run), and one
model trained on two volumes."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from psc.models.weights import load_weights
from psc.pipelines.em.affinities import affinities_from_labels, channel_names, known_pairs, long_range_offsets
from psc.pipelines.em.augment import AugmentConfig, Augmenter
from psc.pipelines.em.intensity import measure
from psc.pipelines.em.normalise import normaliser
from psc.pipelines.em.train import EMTrainConfig, held_out_split, train
from psc.pipelines.em.volumes import open_volume
from psc.utils.errors import InputError

from em_fixtures import TINY_OPTIONS, synthetic_raw

OFF = AugmentConfig(missing_section=0.0, misalignment=0.0, elastic=0.0, contrast=(1.0, 1.0),
                    brightness=(0.0, 0.0), gamma=(1.0, 1.0), noise=0.0, blur=0.0)


def test_long_range_affinities_match_a_per_voxel_reference():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(7, 8, 9))
    offsets = long_range_offsets((2, 3))
    assert offsets[:3] == ((-1, 0, 0), (0, -1, 0), (0, 0, -1)) and len(offsets) == 9
    assert channel_names(offsets)[0] == "affinity z" and channel_names(offsets)[8] == "affinity x at 3"
    target, mask = affinities_from_labels(labels, background=0, offsets=offsets)
    known = rng.random(labels.shape) > 0.2
    both = known_pairs(known, offsets)
    for channel, offset in enumerate(offsets):
        for p in itertools.product(*(range(s) for s in labels.shape)):
            q = tuple(a + o for a, o in zip(p, offset))
            if min(q) < 0:
                assert mask[channel][p] == 0 and target[channel][p] == 0 and not both[channel][p]
                continue
            a, b = labels[p], labels[q]
            assert target[channel][p] == float(a == b and a != 0)
            assert mask[channel][p] == float(a != 0 or b != 0)
            assert both[channel][p] == (known[p] and known[q])


def _volume(shape=(24, 24, 24)):
    """A raw whose intensity is a function of the label, so raw and labels can be checked
    to have moved together."""
    rng = np.random.default_rng(1)
    labels = (rng.integers(1, 6, size=(3, 3, 3)).repeat(8, 0).repeat(8, 1).repeat(8, 2)).astype(np.int64)
    raw = (labels * 0.1).astype(np.float32)
    return raw[: shape[0], : shape[1], : shape[2]], labels[: shape[0], : shape[1], : shape[2]]


def _consistent(raw, labels):
    known = labels > 0
    return np.allclose(raw[known], labels[known] * 0.1, atol=1e-5)


def test_orientation_moves_raw_and_labels_together():
    raw, labels = _volume()
    for seed in range(5):
        r, lab = Augmenter(np.random.default_rng(seed), OFF)(raw, labels)
        assert r.shape == raw.shape and _consistent(r, lab)
        assert sorted(np.unique(lab)) == sorted(np.unique(labels))


def test_misalignment_shifts_raw_and_labels_and_forgets_what_wrapped():
    raw, labels = _volume()
    config = AugmentConfig(**{**OFF.__dict__, "misalignment": 1.0})
    changed = 0
    for seed in range(8):
        augmenter = Augmenter(np.random.default_rng(seed), config)
        r, lab = augmenter.misalign(raw, labels)
        assert _consistent(r, lab)  # raw and labels moved together where labels are known
        changed += int(not np.array_equal(lab, labels))
        assert (lab == 0).any()  # the wrapped-in strip is unknown
    assert changed == 8


def test_missing_section_changes_one_slice_of_the_raw_only():
    raw, labels = _volume()
    augmenter = Augmenter(np.random.default_rng(3), OFF)
    r = augmenter.missing_section(raw)
    differs = [z for z in range(raw.shape[0]) if not np.array_equal(r[z], raw[z])]
    assert len(differs) == 1


def test_elastic_deformation_warps_raw_and_labels_alike():
    raw, labels = _volume()
    augmenter = Augmenter(np.random.default_rng(2), AugmentConfig(elastic_sigma=2.0))
    r, lab = augmenter.elastic(raw, labels)
    assert r.shape == raw.shape and not np.array_equal(lab, labels)
    # raw is interpolated linearly, labels by nearest neighbour at the same coordinates:
    # inside objects (away from label changes) the raw still encodes the label, except
    # where a compressed boundary lies within one voxel
    interior = np.ones(lab.shape, bool)
    for axis, shift in itertools.product(range(3), (-1, 1)):
        interior &= np.roll(lab, shift, axis) == lab
    interior &= lab > 0
    assert interior.mean() > 0.3
    assert np.mean(np.abs(r[interior] - lab[interior] * 0.1) < 0.02) > 0.95
    shuffled = np.random.default_rng(0).permutation(lab[interior])  # a warp of the labels alone would fail
    assert np.mean(np.abs(r[interior] - shuffled * 0.1) < 0.02) < 0.5


def test_intensity_augmentation_changes_contrast_but_not_order():
    raw, _ = _volume()
    raw = raw + np.linspace(0, 0.05, raw.size, dtype=np.float32).reshape(raw.shape)
    config = AugmentConfig(**{**OFF.__dict__, "contrast": (0.7, 1.3), "gamma": (0.7, 1.4), "brightness": (-0.1, 0.1)})
    out = Augmenter(np.random.default_rng(4), config).intensity(raw)
    assert not np.allclose(out, raw)
    assert np.array_equal(np.argsort(out, axis=None, kind="stable"), np.argsort(raw, axis=None, kind="stable"))


def test_robust_percentiles_give_two_contrasts_one_input(tmp_path):
    """The same image at two contrasts (as FIB-25 against NeuroProof) reaches the network
    nearly the same after each volume's own percentile scaling, but not after the dtype's."""
    path, raw, _ = synthetic_raw(tmp_path, shape=(32, 32, 32))
    faint = (raw.astype(np.float32) * 0.5 + 60).astype(np.uint8)
    from psc.pipelines.em.volumes import create_volume

    v = create_volume(tmp_path / "faint.zarr", "raw", faint.shape, "uint8", (16, 16, 16), (8, 8, 8))
    v.write(v.roi, faint)
    bright_volume, faint_volume = open_volume(str(path), "raw"), open_volume(str(tmp_path / "faint.zarr"), "raw")
    a = normaliser("robust-percentiles", measure(bright_volume)[0])(raw)
    b = normaliser("robust-percentiles", measure(faint_volume)[0])(faint)
    assert np.abs(a - b).mean() < 0.02
    da, db = normaliser("divide-by-dtype-max")(raw), normaliser("divide-by-dtype-max")(faint)
    assert np.abs(da - db).mean() > 4 * np.abs(a - b).mean()
    with pytest.raises(InputError, match="percentiles"):
        normaliser("robust-percentiles", {})(raw)  # a block's own percentiles would differ per block


def test_histogram_equalisation_undoes_a_nonlinear_contrast(tmp_path):
    """The same image through a gamma curve (another detector's response) reaches the
    network nearly the same after each volume's own histogram equalisation, and closer
    than after robust percentiles, which only undo a linear change; values are ranks."""
    path, raw, _ = synthetic_raw(tmp_path, shape=(32, 32, 32))
    curved = (255.0 * (raw.astype(np.float32) / 255.0) ** 2.2).round().astype(np.uint8)
    from psc.pipelines.em.volumes import create_volume

    v = create_volume(tmp_path / "curved.zarr", "raw", curved.shape, "uint8", (16, 16, 16), (8, 8, 8))
    v.write(v.roi, curved)
    first, second = measure(open_volume(str(path), "raw"))[0], measure(open_volume(str(tmp_path / "curved.zarr"), "raw"))[0]
    a = normaliser("histogram-equalisation", first)(raw)
    b = normaliser("histogram-equalisation", second)(curved)
    assert 0.0 <= a.min() and a.max() <= 1.0
    assert abs(float(np.median(a)) - 0.5) < 0.05  # ranks: half the voxels below the middle
    ra, rb = normaliser("robust-percentiles", first)(raw), normaliser("robust-percentiles", second)(curved)
    assert np.abs(a - b).mean() < 0.03
    assert np.abs(ra - rb).mean() > 2 * np.abs(a - b).mean()
    # a block is mapped by the volume's record, so a crop equals the crop of the whole
    assert np.array_equal(normaliser("histogram-equalisation", first)(raw[4:20, 8:24, :16]), a[4:20, 8:24, :16])
    with pytest.raises(InputError, match="quantiles"):
        normaliser("histogram-equalisation", {"p1": 0, "p99": 1})(raw)


def test_held_out_region_is_the_end_of_the_longest_axis():
    train_roi, val_roi = held_out_split((50, 200, 100), 0.25)
    assert tuple(val_roi.begin) == (0, 148, 0) and tuple(val_roi.shape) == (50, 52, 100)
    assert tuple(train_roi.shape) == (50, 148, 100)
    _, val_roi = held_out_split((20, 40, 40), 0.25)  # ties: the last axis
    assert tuple(val_roi.begin) == (0, 0, 28)  # 30 floored to the pooling grid


def test_one_model_from_two_volumes_with_long_range_targets(tmp_path):
    first, _, _ = synthetic_raw(tmp_path, shape=(32, 40, 48), name="a.zarr", seed=1)
    second, _, _ = synthetic_raw(tmp_path, shape=(32, 48, 40), name="b.zarr", seed=2)
    cfg = EMTrainConfig(raw=[f"{first}/raw", f"{second}/raw"], labels=[f"{first}/labels", f"{second}/labels"],
                        out=str(tmp_path / "run"), conv="p1sc1", options=TINY_OPTIONS, out_size=8, batch=2,
                        iterations=4, val_every=4, threads=1, export=str(tmp_path / "w.pt"), long_range=[3])
    train(cfg)
    model, card = load_weights(tmp_path / "w.pt")
    assert card.out_channels == 6 and card.labels[5] == "affinity x at 3"
    assert card.normalisation == "robust-percentiles"
    assert [v["raw"] for v in card.training["volumes"]] == cfg.raw
    assert set(card.metrics["val_per_volume"]) == set(cfg.raw)
    with pytest.raises(InputError, match="one labels volume per raw"):
        EMTrainConfig(raw=[f"{first}/raw"], labels=[], out="x")


def test_a_percentile_long_range_model_runs_blockwise_as_in_memory(tmp_path):
    """A card naming robust-percentiles and 9 output channels through prepare + run: the
    run scales every block by the volume's measured percentiles (stored at prepare) and
    stores the nearest-neighbour channels, equal to the whole volume predicted at once."""
    import torch

    from psc.models import build_model
    from psc.models.weights import ModelCard, save_weights
    from psc.pipelines.em import layout
    from psc.pipelines.em.affinities import from_uint8, to_uint8
    from psc.pipelines.em.predict import AffinityPredictor
    from psc.pipelines.em.run import prepare, run

    path, _, _ = synthetic_raw(tmp_path, shape=(32, 40, 48))
    offsets = long_range_offsets((3, 9))
    torch.manual_seed(0)
    model = build_model("unet3d", conv="p1sc1", out_channels=len(offsets), **TINY_OPTIONS)
    card = ModelCard(backbone="unet3d", conv="p1sc1", options=TINY_OPTIONS, in_channels=1, out_channels=9,
                     labels=channel_names(offsets), task="test", normalisation="robust-percentiles",
                     kind="em-affinity")
    weights = tmp_path / "lr.pt"
    save_weights(model, card, weights)
    out = tmp_path / "out.zarr"
    prepare(f"{path}/raw", out, weights, block_size=(16, 24, 16), workers=1)
    run(out, workers=0, progress=False)
    stored = open_volume(str(out), layout.AFFINITIES)
    raw = open_volume(str(path), "raw")
    settings = layout.RunSettings.load(out)
    assert settings.raw_intensity["p1"] < settings.raw_intensity["p99"]
    whole = AffinityPredictor(weights, intensity=measure(raw)[0]).predict(raw, raw.roi)
    data = stored.read(stored.roi)
    assert data.shape == whole.shape == (3, 32, 40, 48)
    np.testing.assert_allclose(from_uint8(data), from_uint8(to_uint8(whole)), atol=1.5 / 255)
    everything = AffinityPredictor(weights, intensity=measure(raw)[0]).predict(raw, raw.roi, all_channels=True)
    assert everything.shape[0] == 9 and np.array_equal(everything[:3], whole)
