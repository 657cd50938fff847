"""Affinity prediction for one region: the body of the blockwise *predict* stage.

The EM network is a valid-padded U-Net: an output voxel sees exactly ``context`` voxels
of raw on each side and nothing else, so a block predicted from its write region grown by
``context`` equals the same voxels of a whole-volume prediction. Two details keep that
exact: raw outside the volume is mirrored about the *volume* border (``read_clamped``),
and every input window starts on the network's pooling grid (the block size is a
multiple of the total down-sampling factor), so max-pooling sees the same windows.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from funlib.geometry import Coordinate, Roi

from psc.models.weights import EM_AFFINITY
from psc.utils.errors import InputError

from ..inference import InferenceNetwork, load_network, prepare_network
from .affinities import OFFSETS
from .normalise import normaliser
from .volumes import Volume, read_clamped

NEAREST_CHANNELS = len(OFFSETS)


class AffinityPredictor:
    """A loaded EM model that predicts affinities for any region of a raw volume.

    Built once per worker process (weights are read and hashed once), then called per
    block. ``precision``: ``auto``, ``fp32``, ``bf16`` or ``fp16`` autocast
    (``psc.pipelines.precision``), resolved on this worker's device. The raw is
    normalised as the card says (``psc.pipelines.em.normalise``).
    """

    def __init__(self, weights: str | Path, device: str = "cpu", precision: str = "fp32",
                 intensity: dict | None = None) -> None:
        self._setup(load_network(weights, EM_AFFINITY, device, precision, channels_last=False), str(weights),
                    intensity=intensity)

    @classmethod
    def from_model(cls, model: torch.nn.Module, normalisation: str,
                   intensity: dict | None = None) -> "AffinityPredictor":
        """The live ``model`` (unfused, CPU, fp32) behind exactly the inference code:
        training's validation, whose weights change between calls."""
        predictor = cls.__new__(cls)
        network = prepare_network(model, "cpu", "fp32", fuse=False, channels_last=False)
        predictor._setup(network, "the training network", normalisation, intensity)
        return predictor

    def _setup(self, network: InferenceNetwork, source: str, normalisation: str | None = None,
               intensity: dict | None = None) -> None:
        self.network = network
        self.model = network.module
        self.card = network.card
        self.normalise = normaliser(normalisation or self.card.normalisation, intensity)
        if getattr(self.model, "padding", "valid") != "valid":
            raise InputError(f"{source}: blockwise prediction needs a valid-padded U-Net")
        self.device, self.dtype = network.device, network.dtype
        factors = np.prod(np.array(self.model.downsample_factors), axis=0)
        self.grid = Coordinate(int(f) for f in factors)
        self.context = Coordinate(self._context())

    def _valid_sizes(self) -> tuple[int, int, int]:
        """(smallest input size, its output size, step between valid output sizes).

        The step is the pooling grid: inputs between two valid sizes are floored by
        max-pooling and would break the translation equivariance. A valid network gives
        an output for every input from the smallest on and none below it, so the
        smallest is found by bisection: 12 probes of ``output_shape`` (a forward pass on
        the meta device) instead of one per size up to it (45 for the shipped U-Net,
        2-3 s more of every predict worker's start on a 2-core CPU, ``benchmarks/em.py
        --blocks``)."""
        step = max(self.grid)

        @functools.cache
        def output(size: int) -> int:
            try:
                return int(self.model.output_shape((size, size, size))[0])
            except RuntimeError:
                return 0

        low, high = 1, 1024
        if output(high) <= 0:
            raise ValueError("the network produces no output for inputs up to 1024 voxels")
        while low < high:
            middle = (low + high) // 2
            if output(middle) > 0:
                high = middle
            else:
                low = middle + 1
        out = output(low)
        if output(low + step) != out + step:
            raise ValueError("the network's output does not grow with its input")
        return low, out, step

    def _context(self) -> tuple[int, ...]:
        first, first_out, self._step = self._valid_sizes()
        self._first_out = first_out
        return ((first - first_out) // 2,) * 3

    def _valid_output(self, size: int) -> int:
        """The smallest output size >= ``size`` that the network can produce."""
        if size <= self._first_out:
            return self._first_out
        return self._first_out + -(-(size - self._first_out) // self._step) * self._step

    @torch.inference_mode()
    def predict(self, raw: Volume, roi: Roi, all_channels: bool = False) -> np.ndarray:
        """Nearest-neighbour affinities (float32, ``(3, *roi.shape)``) of the voxels in
        ``roi``; ``all_channels``: every output channel (long-range ones too, in the
        card's ``labels`` order), for agglomerations that use them."""
        if any(o % g for o, g in zip(roi.offset, self.grid)):
            raise ValueError(f"block offset {roi.offset} is not on the pooling grid {self.grid}")
        out_shape = Coordinate(self._valid_output(int(s)) for s in roi.shape)
        in_roi = Roi(roi.offset - self.context, out_shape + self.context * 2)
        # inside the volume there is nothing to mirror: read it as it is (read_clamped's
        # index arrays copy the block once more, as long as the read itself)
        data = raw.read(in_roi) if raw.roi.contains(in_roi) else read_clamped(raw, in_roi)
        if data.dtype.kind == "f" and not np.isfinite(data).all():  # the prepare-time sample missed them
            raise InputError(f"the raw has NaN or infinite voxels in {in_roi}: fix the source")
        x = torch.from_numpy(self.normalise(data))[None, None]
        y = self.network(x).float()[0].cpu().numpy()
        # channels 0-2 are the nearest-neighbour affinities the pipeline segments; models
        # trained with long-range affinities (train.LONG_RANGE) have more after them
        channels = slice(None) if all_channels else slice(0, NEAREST_CHANNELS)
        return np.ascontiguousarray(y[(channels, *(slice(0, s) for s in roi.shape))])
