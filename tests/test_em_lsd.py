"""Local shape descriptors (pipelines/em/lsd.py) against a voxel-by-voxel sum over each
window, their geometry on shapes whose answer is known, and psc-train em with them as
auxiliary targets (channels, loss, card, and predict still giving three affinities)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from psc.models.weights import load_weights
from psc.pipelines.em.intensity import measure
from psc.pipelines.em.lsd import CHANNELS, local_shape_descriptors, window_radius
from psc.pipelines.em.predict import AffinityPredictor
from psc.pipelines.em.train import EMTrainConfig, Sampler, TrainingVolume, train, training_loss
from psc.pipelines.em.volumes import open_volume
from psc.utils.errors import InputError

from em_fixtures import TINY_OPTIONS, synthetic_raw


def _kernel_1d(sigma: float) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's sampled, normalised kernel (truncate 3)."""
    radius = window_radius(sigma)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _brute_force(labels: np.ndarray, sigma: float) -> np.ndarray:
    """Every voxel's descriptors as the explicit weighted sums over its window."""
    k, radius = _kernel_1d(sigma), window_radius(sigma)
    out = np.zeros((10, *labels.shape))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in labels.shape], indexing="ij"), -1).astype(np.float64)
    for v in zip(*np.nonzero(labels > 0)):
        lo = [max(0, c - radius) for c in v]
        hi = [min(n, c + radius + 1) for c, n in zip(v, labels.shape)]
        window = tuple(slice(a, b) for a, b in zip(lo, hi))
        w = np.ones([b - a for a, b in zip(lo, hi)])
        for axis in range(3):
            shape = [1, 1, 1]
            shape[axis] = -1
            w = w * k[lo[axis] - v[axis] + radius:hi[axis] - v[axis] + radius].reshape(shape)
        w = w * (labels[window] == labels[v])
        x = grid[window] - np.array(v, np.float64)  # offsets from v (the covariance does not care)
        size = w.sum()
        mean = (w[..., None] * x).reshape(-1, 3).sum(0) / size
        centred = x - mean
        c, ww = centred.reshape(-1, 3), w.reshape(-1)
        cov = (c * ww[:, None]).T @ c / size
        out[(slice(None), *v)] = [size, *(mean / sigma * 0.5 + 0.5), *np.diag(cov) / sigma ** 2,
                                  cov[0, 1] / sigma ** 2 * 0.5 + 0.5, cov[0, 2] / sigma ** 2 * 0.5 + 0.5,
                                  cov[1, 2] / sigma ** 2 * 0.5 + 0.5]
    return np.clip(out, 0, 1)


@pytest.mark.parametrize("sigma", [1.0, 1.7])
def test_descriptors_equal_the_explicit_window_sums(sigma):
    rng = np.random.default_rng(4)
    labels = np.zeros((9, 11, 10), np.int64)
    labels[:, :6] = 1
    labels[:, 6:, :4] = 2
    labels[2:7, 7:, 5:] = 3
    labels[rng.random(labels.shape) < 0.08] = 0  # boundary voxels scattered through
    labels[0, 0, 0] = 5  # a one-voxel object
    descriptors, mask = local_shape_descriptors(labels, sigma)
    assert descriptors.shape == (len(CHANNELS), *labels.shape) and descriptors.dtype == np.float32
    np.testing.assert_array_equal(mask, labels > 0)
    np.testing.assert_allclose(descriptors, _brute_force(labels, sigma), atol=2e-5)
    assert not descriptors[:, labels == 0].any()  # no descriptor on boundary voxels



def test_descriptors_of_a_region_are_those_of_the_whole_array_there():
    """The sampler asks only for its output crop; the windows still read labels around it."""
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 6, (14, 16, 15)).repeat(2, axis=1)[:, :16]  # blocky objects, label 0 among them
    whole, whole_mask = local_shape_descriptors(labels, 1.5)
    region = (slice(4, 10), slice(3, 13), slice(5, 15))
    part, part_mask = local_shape_descriptors(labels, 1.5, region)
    np.testing.assert_allclose(part, whole[(slice(None), *region)], atol=2e-5)
    np.testing.assert_array_equal(part_mask, whole_mask[region])
    np.testing.assert_allclose(part, _brute_force(labels, 1.5)[(slice(None), *region)], atol=2e-5)

def test_descriptors_describe_the_shape():
    sigma = 2.0
    # a slab thin along z and wide along y and x: variance small along z, large along x
    slab = np.zeros((21, 31, 31), np.int64)
    slab[9:12] = 1
    d, _ = local_shape_descriptors(slab, sigma)
    centre = (10, 15, 15)
    assert d[(4, *centre)] < 0.2 and d[(6, *centre)] > 0.8  # variance z vs x (of sigma^2)
    np.testing.assert_allclose(d[(slice(1, 4), *centre)], 0.5, atol=1e-6)  # mass centred on the voxel
    np.testing.assert_allclose(d[(slice(7, 10), *centre)], 0.5, atol=1e-6)  # axis-aligned: no covariance
    # at the slab's lower face the mass lies above (offset z > 0.5)
    assert d[1, 9, 15, 15] > 0.55 and d[1, 11, 15, 15] < 0.45
    # a voxel deep in a big object sees the whole window: size 1
    block = np.ones((15, 15, 15), np.int64)
    d, _ = local_shape_descriptors(block, 1.5)
    assert d[0, 7, 7, 7] == pytest.approx(1.0, abs=1e-6) and d[0, 0, 7, 7] < 0.7
    # a diagonal rod has positive covariance between its axes
    rod = np.zeros((21, 21, 21), np.int64)
    for i in range(21):
        rod[i, i, max(0, i - 1):i + 2] = 1
    d, _ = local_shape_descriptors(rod, 2.0)
    assert d[7, 10, 10, 10] > 0.6  # zy covariance


def test_descriptors_reject_bad_input():
    with pytest.raises(ValueError, match="3-D"):
        local_shape_descriptors(np.zeros((4, 4), np.int64), 1.0)
    with pytest.raises(ValueError, match="sigma"):
        local_shape_descriptors(np.zeros((4, 4, 4), np.int64), 0.0)


def test_sampler_adds_descriptor_targets_that_match_the_crop(tmp_path):
    raw, _, _ = synthetic_raw(tmp_path, shape=(32, 48, 64))
    volume = TrainingVolume.open(str(raw / "raw"), str(raw / "labels"), 0.25)
    sampler = Sampler([volume], out_size=8, context=6, seed=0, lsd_sigma=1.5)
    x, target, mask, weight = sampler.sample()
    assert target.shape == (3 + 10, 8, 8, 8) and mask.shape == weight.shape == target.shape
    assert x.shape == (8 + 12,) * 3
    lsd = target[3:]
    assert ((0 <= lsd) & (lsd <= 1)).all() and lsd[0].max() > 0.3
    # mask of the descriptor channels: the object voxels, the same for all ten
    assert (mask[3:] == mask[3]).all() and set(np.unique(mask[3])) <= {0.0, 1.0}
    assert (weight[3:] == mask[3:]).all()
    # without descriptors the sampler draws the same crop and affinity targets
    plain = Sampler([volume], out_size=8, context=6, seed=0)
    x0, target0, _, _ = plain.sample()
    assert target0.shape == (3, 8, 8, 8)
    with pytest.raises(InputError, match="context"):
        Sampler([volume], out_size=8, context=3, seed=0, lsd_sigma=1.5)


def test_the_descriptor_loss_is_learned_on_a_fixed_batch(tmp_path):
    """A tiny network fits one batch's descriptor targets: the squared-error term drops,
    and only the descriptor channels carry it (affinity-only batches have no such term)."""
    from psc.models import build_model

    torch.manual_seed(0)
    raw, _, _ = synthetic_raw(tmp_path, shape=(32, 48, 64))
    volume = TrainingVolume.open(str(raw / "raw"), str(raw / "labels"), 0.25)
    model = build_model("unet3d", conv="conv3d", out_channels=3 + 10, **TINY_OPTIONS)
    batch = [Sampler([volume], out_size=8, context=20, seed=s, lsd_sigma=1.5).sample() for s in (0, 1)]
    x, target, mask, weight = (torch.from_numpy(np.stack(parts)) for parts in zip(*batch))

    def descriptor_term() -> float:
        with torch.no_grad():
            p = model(x[:, None])
            return float(training_loss(p, target, mask, weight, 3) - training_loss(p[:, :3], target[:, :3],
                                                                                   mask[:, :3], weight[:, :3], 3))

    before = descriptor_term()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):
        loss = training_loss(model(x[:, None]), target, mask, weight, 3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before > 0.05 and descriptor_term() < 0.7 * before, (before, descriptor_term())


def test_training_with_descriptors_exports_a_card_that_names_them(tmp_path):
    raw, _, _ = synthetic_raw(tmp_path, shape=(32, 48, 64))
    out = tmp_path / "run"
    cfg = EMTrainConfig(raw=str(raw / "raw"), labels=str(raw / "labels"), out=str(out), conv="p1sc1",
                        options=TINY_OPTIONS, out_size=8, batch=2, iterations=40, val_every=20, lr=3e-3,
                        threads=1, export=str(tmp_path / "w.pt"), data_source="synthetic", data_terms="none",
                        augmentation="basic", long_range=[3], lsd_sigma=1.0)
    train(cfg)
    rows = [line.split(",") for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [20, 40] and all(np.isfinite(float(r[1])) for r in rows)
    model, card = load_weights(tmp_path / "w.pt")
    assert card.out_channels == 6 + 10 and card.training["lsd_sigma"] == 1.0
    assert [card.labels[i] for i in (0, 5, 6, 15)] == ["affinity z", "affinity x at 3", "lsd size",
                                                       "lsd covariance yx"]
    assert "shape descriptors" in card.task
    volume = open_volume(str(raw / "raw"))
    predictor = AffinityPredictor(tmp_path / "w.pt", intensity=measure(volume)[0])
    roi = volume.roi
    assert predictor.predict(volume, roi).shape == (3, *roi.shape)
    assert predictor.predict(volume, roi, all_channels=True).shape == (16, *roi.shape)


def test_lsd_sigma_must_not_be_negative(tmp_path):
    with pytest.raises(InputError, match="lsd-sigma"):
        EMTrainConfig(raw="a", labels="b", out=str(tmp_path), lsd_sigma=-1.0)


def test_body_ids_in_the_trillions_give_the_same_descriptors():
    """Ground-truth body ids are large and sparse; the objects, not the ids, decide."""
    labels = np.random.default_rng(3).integers(0, 5, (12, 14, 13)).repeat(2, axis=0)[:12]
    sparse = np.where(labels > 0, labels.astype(np.int64) * 10**12 + 7, 0)
    np.testing.assert_array_equal(local_shape_descriptors(sparse, 1.5)[0], local_shape_descriptors(labels, 1.5)[0])
