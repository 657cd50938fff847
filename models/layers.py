"""Building blocks shared by the backbones: norm/act by name, and conv chains.

Normalisation and activation are given by name (``"batch"``, ``("relu", {"inplace":
True})``), as MONAI's own nets take them. The names that are plain torch layers (the
backbones' defaults among them) are resolved here, to the same modules MONAI's factories
build (a test compares them); any other name goes to MONAI's factories. Why not always
MONAI: ``import monai`` imports every MONAI submodule and with them scipy, pandas,
matplotlib and scikit-learn, seconds that every command building a network (the EM
pipeline, ``--help``) would pay for two dictionary lookups.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from .conv_registry import ConvBuilder


def full_precision(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                   keep_dtype: bool = True) -> torch.Tensor:
    """``layer(x)`` in fp32 even inside a bf16/fp16 autocast region.

    For the few layers where low precision costs answers rather than time: the first
    convolution, which sees the raw normalised intensities (bf16 keeps 8 significant
    bits, so it would quantise the image itself), and the head that turns features into
    class logits, which decide near-ties between tissues. Both are cheap (one input
    channel; 1x1x1 convolutions). Measured with the shipped MRI model under bf16
    autocast, share of brain voxels labelled as in fp32 (MNI152 sample, IBSR_07,
    IBSR_16): everything in bf16 99.90 % (MNI152); first convolution and the whole head
    (side outputs and classifier) in fp32, as now, 99.95 / 99.95 / 99.96 %. (Before the
    layout fix below, the first dense block also ran in fp32 by accident, and agreement
    was 99.97 / 99.96 / 99.97 %; Dice is the same to 0.0005.) ``keep_dtype``: hand the
    result on in the working precision (the autocast dtype inside an autocast region, else
    ``x``'s) and in channels_last_3d, for the layers after it; otherwise fp32 (logits).

    The layout matters for the first convolution: a one-channel input has the same
    strides in both layouts, torch then picks the contiguous one for the output, and
    every layer after it would run contiguous (and, for a DenseNet whose first block
    concatenates that fp32 output, in fp32): the P2SC2 MRI DenseNet's first dense block
    ran that way, 1.4x slower in bf16, until this put its output back in channels_last."""
    device = x.device.type
    with torch.autocast(device, enabled=False):  # float64 (the receptive-field probe) is kept, not cut to fp32
        out = layer(x if x.dtype == torch.float64 else x.float())
    if not keep_dtype:
        return out
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    return out.to(dtype=dtype, memory_format=torch.channels_last_3d if out.dim() == 5 else torch.preserve_format)


class MaxPool3d(nn.MaxPool3d):
    """``nn.MaxPool3d`` that pools in its input's dtype inside an autocast region.

    CPU autocast runs max pooling in fp32, so a bf16 feature map is copied to fp32,
    pooled, and later cast back for the next convolution. A maximum picks one of its
    inputs and rounds nothing, so pooling in bf16 gives exactly the same values; for
    the EM U-Net at the finest level (12 channels, 100^3 voxels) the autocast way took
    11 ms a pool, about a sixth of the conv3d network's time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type not in ("cpu", "cuda") or not torch.is_autocast_enabled(x.device.type):
            return super().forward(x)
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x)


# MONAI's names (case-insensitive) of the 3-D norms and activations that are torch layers
TORCH_NORMS: dict[str, Callable[..., nn.Module]] = {
    "batch": lambda channels, **kw: nn.BatchNorm3d(channels, **kw),
    "instance": lambda channels, **kw: nn.InstanceNorm3d(channels, **kw),
}
TORCH_ACTS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "prelu": nn.PReLU, "elu": nn.ELU, "relu6": nn.ReLU6,
    "selu": nn.SELU, "celu": nn.CELU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "softmax": nn.Softmax, "logsoftmax": nn.LogSoftmax,
}


def _name_and_args(spec) -> tuple[str, dict]:
    if isinstance(spec, str):
        return spec, {}
    name, args = spec
    return name, dict(args)


def norm_layer(norm, channels: int) -> list[nn.Module]:
    if norm is None:
        return []
    name, args = _name_and_args(norm)
    if isinstance(name, str) and name.lower() in TORCH_NORMS:
        return [TORCH_NORMS[name.lower()](channels, **args)]
    from monai.networks.layers.utils import get_norm_layer

    return [get_norm_layer(norm, spatial_dims=3, channels=channels)]


def act_layer(act) -> list[nn.Module]:
    if act is None:
        return []
    name, args = _name_and_args(act)
    if isinstance(name, str) and name.lower() in TORCH_ACTS:
        return [TORCH_ACTS[name.lower()](**args)]
    from monai.networks.layers.utils import get_act_layer

    return [get_act_layer(act)]


class ConvChain(nn.Sequential):
    """``count`` consecutive 3x3x3 convolutions of a plain network, each followed by
    norm and activation, built with ``conv``.

    A builder whose blocks stand for ``n`` convolutions (``p{m}sc{n}``) fills the
    chain with ``ceil(count / n)`` blocks, so a U-Net level of two convolutions is
    one P2SC2 block, and a single DenseNet convolution is one block whatever ``n``.
    ``stride`` applies to the first block. ``last_act=False`` leaves the activation
    of the last block out (for residual blocks that add before activating).
    """

    def __init__(
        self,
        conv: ConvBuilder,
        in_channels: int,
        out_channels: int,
        count: int = 1,
        stride=1,
        padding: str = "same",
        norm=None,
        act=("relu", {"inplace": True}),
        bias: bool | None = None,
        last_act: bool = True,
    ) -> None:
        blocks = math.ceil(count / conv.convs_per_block)
        pad = 1 if padding == "same" else 0
        if bias is None:
            bias = norm is None
        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(blocks):
            layers.append(conv(channels, out_channels, 3, stride=stride if i == 0 else 1, padding=pad, bias=bias))
            layers += norm_layer(norm, out_channels)
            if last_act or i < blocks - 1:
                layers += act_layer(act)
            channels = out_channels
        super().__init__(*layers)
