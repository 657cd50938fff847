"""Synthetic scans for the MRI tests: a two-tissue ellipsoid on any grid, and a tiny
saved model. Imported by the test modules (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import torch
from torch import nn

from psc.models import build_model
from psc.models.weights import ModelCard, save_weights
from psc.pipelines.mri.config import LABELS

TINY = {"init_channels": 4, "growth_rate": 4, "block_layers": [1, 1], "side_channels": 4}


def oblique_affine(zooms=(0.9, 1.5, 0.9), angle_deg=20.0, flip=(1, 1, 1)) -> np.ndarray:
    a = math.radians(angle_deg)
    rotation = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(np.array(zooms) * np.array(flip))
    affine[:3, 3] = [-20.0, 15.0, -10.0]
    return affine


def brain_phantom(shape=(36, 30, 34), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Image (int16) and truth: WM (3) core, GM (2) shell, 0 outside; skull-stripped."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt(((grid / np.array([0.9, 0.8, 0.85]).reshape(3, 1, 1, 1)) ** 2).sum(0))
    truth = np.zeros(shape, np.uint8)
    truth[radius < 0.95] = 2
    truth[radius < 0.6] = 3
    image = np.choose(truth, [0, 0, 80, 160]).astype(np.float32) + rng.normal(0, 4, shape) * (truth > 0)
    return np.clip(image, 0, None).astype(np.int16), truth


def save_nifti(path, array, affine, qcode=1, scode=2):
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=qcode)
    image.set_sform(affine, code=scode)
    nib.save(image, str(path))
    return path


class ThresholdNet(nn.Module):
    """A stand-in network with a known answer: WM where the normalised intensity is
    above the brain mean, GM below it. Lets tests check geometry, not learning."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros_like(x)
        return torch.cat([zero - 5, zero - 5, -10 * x, 10 * x], dim=1)


def threshold_card(spacing=(1.2, 1.2, 1.2)) -> ModelCard:
    return ModelCard(backbone="densenet3d", conv="p2sc2", options=dict(TINY), in_channels=1, out_channels=4,
                     labels=dict(LABELS), spacing=tuple(spacing))


def save_tiny_model(path, seed=0):
    torch.manual_seed(seed)
    model = build_model("densenet3d", conv="p2sc2", in_channels=1, out_channels=4, **TINY)
    card = ModelCard(backbone="densenet3d", conv="p2sc2", options=dict(TINY), in_channels=1, out_channels=4,
                     labels=dict(LABELS), spacing=(1.0, 1.5, 1.0), training={"data": "none (random init)"})
    save_weights(model, card, path)
    return path
