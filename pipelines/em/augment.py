"""Training augmentation for the affinity U-Net: what differs between FIB-SEM volumes.

A model that learned one volume's contrast, texture and section quality fails on the next
volume (issue 15: the FIB-25 model merged nearly everything on NeuroProof). Each
augmentation imitates one way real volumes differ, and all of them act on the raw *and*
the labels before the affinity targets are computed, so targets always match what the
network sees:

- **section defects** along z, the milling / cutting axis (applied first, before axes are
  transposed): a *missing section* (one slice blank or a copy of its neighbour, labels
  unchanged: the network must bridge it) and a *misalignment* (the slices from one on
  shifted in y and x, raw and labels together; or one slice alone slipped), as in
  Funke et al. 2018 (IEEE TPAMI 41:1669) and Lee et al. 2017 (arXiv:1706.00120);
- **elastic deformation**: a smooth random displacement field (coarse control grid,
  linear upsampling; raw linear, labels nearest), so the network sees other neurite
  shapes and calibres;
- **flips and axis transposes** (FIB-SEM is isotropic, so all 48 orientations are real);
- **intensity**: contrast, brightness, gamma, Gaussian noise and blur on the normalised
  raw: other detectors, dwell times and focus.

``Augmenter(rng)(raw, labels)``: ``raw`` float32, ``labels`` int64 with 0 = unknown (the
sampler's convention: data label + 1 inside the training region), both of one cubic
shape. Voxels whose label is unknown after a transform (shifted in from outside the crop)
are set to 0 so their edges are masked.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges; one place, recorded on the model card."""

    missing_section: float = 0.1      # probability per crop of one blank / duplicated slice
    misalignment: float = 0.1         # probability per crop of a shifted (or slipped) section
    max_shift: int = 4                # voxels, each of y and x
    elastic: float = 0.5              # probability per crop
    elastic_spacing: int = 12         # control-point spacing, voxels
    elastic_sigma: float = 1.5        # displacement std at the control points, voxels
    contrast: tuple = (0.7, 1.3)      # scale about the crop's mean
    brightness: tuple = (-0.15, 0.15)  # added, in units of the normalised range
    gamma: tuple = (0.7, 1.4)
    noise: float = 0.5                # probability of Gaussian noise
    noise_sigma: tuple = (0.0, 0.08)
    blur: float = 0.3                 # probability of Gaussian blur
    blur_sigma: tuple = (0.3, 1.0)


# the recipes psc-train em --augmentation names: full (issue 15) and basic (the recipe
# before it: flips, transposes, mild contrast and gamma)
RECIPES = {
    "full": AugmentConfig(),
    "basic": AugmentConfig(missing_section=0.0, misalignment=0.0, elastic=0.0, contrast=(0.8, 1.2),
                           brightness=(-0.1, 0.1), gamma=(0.8, 1.25), noise=0.0, blur=0.0),
}


class Augmenter:
    def __init__(self, rng: np.random.Generator, config: AugmentConfig = AugmentConfig()) -> None:
        self.rng, self.config = rng, config

    def __call__(self, raw: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c, rng = self.config, self.rng
        if rng.random() < c.missing_section:
            raw = self.missing_section(raw)
        if rng.random() < c.misalignment:
            raw, labels = self.misalign(raw, labels)
        if rng.random() < c.elastic:
            raw, labels = self.elastic(raw, labels)
        raw, labels = self.orient(raw, labels)
        raw = self.intensity(raw)
        return np.ascontiguousarray(raw, dtype=np.float32), np.ascontiguousarray(labels)

    def missing_section(self, raw: np.ndarray) -> np.ndarray:
        raw = raw.copy()
        z = int(self.rng.integers(1, raw.shape[0] - 1))
        if self.rng.random() < 0.5:
            raw[z] = self.rng.uniform(0.0, 1.0)  # a blank section, of some grey
        else:
            raw[z] = raw[z - 1]  # a section imaged twice (and the real one lost)
        return raw

    def misalign(self, raw: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        m = self.config.max_shift
        shift = [int(v) for v in self.rng.integers(-m, m + 1, size=2)]
        if shift == [0, 0]:
            shift[0] = 1
        z = int(self.rng.integers(1, raw.shape[0]))
        raw, labels = raw.copy(), labels.copy()
        last = raw.shape[0] if self.rng.random() < 0.5 else z + 1  # shifted from z on, or slice z slipped
        raw[z:last] = np.roll(raw[z:last], shift, axis=(1, 2))
        labels[z:last] = np.roll(labels[z:last], shift, axis=(1, 2))
        for axis, s in zip((1, 2), shift):  # what wrapped round is not what lies there
            if s:
                index = [slice(z, last), slice(None), slice(None)]
                index[axis] = slice(0, s) if s > 0 else slice(s, None)
                labels[tuple(index)] = 0
        return raw, labels

    def elastic(self, raw: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        grid = [max(2, int(np.ceil(s / c.elastic_spacing)) + 1) for s in raw.shape]
        coordinates = np.stack(np.meshgrid(*(np.arange(s, dtype=np.float32) for s in raw.shape), indexing="ij"))
        for axis in range(3):
            coarse = self.rng.normal(0.0, c.elastic_sigma, size=grid).astype(np.float32)
            zoom = [s / g for s, g in zip(raw.shape, grid)]
            field = ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)
            coordinates[axis] += field[tuple(slice(0, s) for s in raw.shape)]
        raw = ndimage.map_coordinates(raw, coordinates, order=1, mode="mirror").astype(np.float32)
        labels = ndimage.map_coordinates(labels, coordinates, order=0, mode="constant", cval=0)
        return raw, labels

    def orient(self, raw: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = self.rng.permutation(3)
        raw, labels = raw.transpose(order), labels.transpose(order)
        for axis in range(3):
            if self.rng.random() < 0.5:
                raw, labels = np.flip(raw, axis), np.flip(labels, axis)
        return raw, labels

    def intensity(self, raw: np.ndarray) -> np.ndarray:
        c, rng = self.config, self.rng
        mean = float(raw.mean())
        raw = (raw - mean) * rng.uniform(*c.contrast) + mean + rng.uniform(*c.brightness)
        gamma = rng.uniform(*c.gamma)
        raw = np.sign(raw) * np.abs(raw) ** gamma  # defined (and monotone) beyond [0, 1] too
        if rng.random() < c.blur:
            raw = ndimage.gaussian_filter(raw, rng.uniform(*c.blur_sigma))
        if rng.random() < c.noise:
            raw = raw + rng.normal(0.0, rng.uniform(*c.noise_sigma), size=raw.shape)
        return raw.astype(np.float32)
