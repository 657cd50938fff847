"""The convolution registry: one name per kind of 3x3x3 convolution.

Backbones never construct a convolution themselves; they receive a builder (the
torchvision ``conv_builder`` / nnU-Net ``conv_op`` pattern) so that a new kind of
convolution can be swapped in without forking the network. ``make_conv`` turns a
name such as ``"conv3d"`` or ``"p2sc3"`` into that builder.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .pmscn import PmSCn

_PMSCN_NAME = re.compile(r"^p([1-3])sc([1-9][0-9]*)$")


@dataclass(frozen=True)
class ConvBuilder:
    """A constructor with ``nn.Conv3d``'s call signature.

    ``convs_per_block`` says how many consecutive plain convolutions one module
    built by it stands for: 1 for ``conv3d``, ``n`` for ``p{m}sc{n}``.
    """

    name: str
    m: int = 0
    n: int = 1

    @property
    def convs_per_block(self) -> int:
        return self.n

    @property
    def is_separable(self) -> bool:
        return self.m > 0

    def __call__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
    ) -> nn.Module:
        if not self.is_separable:
            return nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if dilation not in (1, (1, 1, 1)) or groups != 1:
            raise ValueError(f"{self.name} supports neither dilation nor groups")
        if not isinstance(kernel_size, int):
            if len(set(kernel_size)) != 1:
                raise ValueError(f"{self.name} needs a cubic kernel, got {kernel_size}")
            kernel_size = kernel_size[0]
        if not isinstance(padding, (int, str)):
            if len(set(padding)) != 1:
                raise ValueError(f"{self.name} needs the same padding on every axis, got {padding}")
            padding = padding[0]
        return PmSCn(in_channels, out_channels, m=self.m, n=self.n, kernel_size=kernel_size,
                     stride=stride, padding=padding, bias=bias)


def make_conv(name: str | ConvBuilder) -> ConvBuilder:
    """Builder for ``"conv3d"`` or ``"p{m}sc{n}"`` (m in 1..3, n >= 1)."""
    if isinstance(name, ConvBuilder):
        return name
    key = str(name).strip().lower()
    if key == "conv3d":
        return ConvBuilder("conv3d")
    match = _PMSCN_NAME.match(key)
    if match is None:
        raise ValueError(f"unknown convolution {name!r}: use 'conv3d' or 'p{{m}}sc{{n}}' with m in 1..3, n >= 1")
    return ConvBuilder(key, m=int(match.group(1)), n=int(match.group(2)))


# The variants the paper compares, in the order tables list them.
STANDARD_CONVS = ("conv3d", "p1sc1", "p2sc2", "p2sc3")
