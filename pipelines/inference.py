"""One way to make a trained network ready for inference, for both pipelines.

MRI segmentation, the EM predict stage and EM training's validation all run a network
the same way: fused for inference (convolution + batch norm + ReLU in one oneDNN kernel
on CPU, ``psc.models.fusion``), moved to its device, in channels-last memory, in the
precision resolved on that device, under autocast. Doing that in one place means a
speed-up or a precision rule reaches every caller at once, and a network is prepared
once per command (or worker), not once per scan or block.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from psc.models.fusion import fuse_for_inference
from psc.models.weights import ModelCard, load_weights

from .devices import resolve_device
from .precision import autocast, precision_name, resolve_precision


@dataclass
class InferenceNetwork:
    """A network ready to run: ``module`` on ``device``, run in ``dtype`` by ``__call__``.
    ``card`` is the weights' contract when the network came from a weights file."""

    module: nn.Module
    device: torch.device
    dtype: torch.dtype
    card: ModelCard | None = None

    @property
    def precision(self) -> str:
        return precision_name(self.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output for ``x`` (moved to the device, channels-last), in the
        network's precision: callers cast to fp32 where they need it."""
        x = x.to(self.device).contiguous(memory_format=torch.channels_last_3d)
        with autocast(self.device, self.dtype):
            return self.module(x)


def prepare_network(model: nn.Module, device: str | torch.device = "auto", precision: str = "auto",
                    *, fuse: bool = True, channels_last: bool = True,
                    card: ModelCard | None = None) -> InferenceNetwork:
    """``model`` ready for inference on ``device`` in ``precision`` (``auto``, ``fp32``,
    ``bf16``, ``fp16``; see ``psc.pipelines.precision``).

    ``fuse``: run a fused eval-mode copy (``model`` itself is untouched). Training's
    validation passes ``fuse=False`` to run the live network, whose weights change
    between validations; it is put in eval mode by the caller. ``channels_last``: keep
    the weights channels-last too (the input always is). The EM U-Net keeps contiguous
    weights: its affinities were recorded that way, and oneDNN picks other kernels for
    channels-last weights, which moves a few uint8 affinities by one step."""
    target = resolve_device(device) if isinstance(device, str) else torch.device(device)
    dtype = resolve_precision(precision, target)
    module = fuse_for_inference(model) if fuse else model
    module = module.to(target)
    if channels_last:
        module = module.to(memory_format=torch.channels_last_3d)
    return InferenceNetwork(module, target, dtype, card)


def load_network(weights: str | Path, kind: str, device: str | torch.device = "auto",
                 precision: str = "auto", *, channels_last: bool = True) -> InferenceNetwork:
    """The weights ``weights`` (sha256 and ``kind`` checked against their card) as a
    network ready for inference."""
    model, card = load_weights(weights, map_location="cpu", kind=kind)
    return prepare_network(model, device, precision, channels_last=channels_last, card=card)
