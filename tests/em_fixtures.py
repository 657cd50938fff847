"""Shared pieces of the EM tests: a tiny untrained affinity U-Net with its card, and a
synthetic raw volume in zarr. Untrained weights give arbitrary but deterministic
affinities: exactly what tests of geometry, blockwise equality and resume need."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from psc.models import build_model
from psc.models.weights import ModelCard, save_weights
from psc.pipelines.em.synthetic import make_em_volume
from psc.pipelines.em.volumes import create_volume

TINY_OPTIONS = {"num_fmaps": 4, "fmap_inc_factor": 2, "downsample_factors": [[2, 2, 2], [2, 2, 2]]}


def tiny_weights(folder: Path, conv: str = "p2sc2", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = build_model("unet3d", conv=conv, **TINY_OPTIONS)
    # a positive bias on the head keeps untrained affinities away from all-boundary
    with torch.no_grad():
        model.head.bias.fill_(1.0)
    card = ModelCard(backbone="unet3d", conv=conv, options=TINY_OPTIONS, in_channels=1, out_channels=3,
                     task="test", normalisation="divide-by-dtype-max")
    path = folder / f"tiny_{conv}.pt"
    save_weights(model, card, path)
    return path


def synthetic_raw(folder: Path, shape=(40, 56, 48), name: str = "raw.zarr", seed: int = 1,
                  chunks=(16, 16, 16)) -> tuple[Path, np.ndarray, np.ndarray]:
    raw, labels = make_em_volume(shape, cell_size=14, seed=seed)
    path = folder / name
    volume = create_volume(path, "raw", raw.shape, "uint8", chunks, (8, 8, 8), offset=(80, 0, 16))
    volume.write(volume.roi, raw)
    gt = create_volume(path, "labels", labels.shape, "uint64", chunks, (8, 8, 8), offset=(80, 0, 16))
    gt.write(gt.roi, labels)
    return path, raw, labels
