"""3D U-Net for nearest-neighbour affinities (Funke et al. 2017, arXiv:1709.02974),
the EM backbone of the PmSCn paper (section 4.3).

Three down/up levels; two 3x3x3 convolutions per level (one ``p{m}sc{2}`` block);
feature maps multiplied by ``fmap_inc_factor`` per level; max-pool down, transposed
convolution up; a 1x1x1 head with a sigmoid giving one affinity per axis.
``padding="valid"`` gives the translation-equivariant network used for seamless
blockwise prediction (skip connections are centre-cropped), ``"same"`` keeps sizes.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from .conv_registry import ConvBuilder
from .layers import ConvChain, MaxPool3d
from .model_registry import register_model


def center_crop(x: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    for axis, size in enumerate(shape):
        offset = (x.shape[2 + axis] - size) // 2
        x = x.narrow(2 + axis, offset, size)
    return x


class UNet3d(nn.Module):
    def __init__(
        self,
        conv: ConvBuilder,
        in_channels: int = 1,
        out_channels: int = 3,
        num_fmaps: int = 12,
        fmap_inc_factor: int = 3,
        downsample_factors: Sequence[Sequence[int]] = ((2, 2, 2), (2, 2, 2), (2, 2, 2)),
        padding: str = "valid",
        norm=None,
        act=("relu", {"inplace": True}),
        final_activation: str | None = "sigmoid",
    ) -> None:
        super().__init__()
        if padding not in ("valid", "same"):
            raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
        self.padding = padding
        self.in_channels = in_channels
        self.downsample_factors = [tuple(f) for f in downsample_factors]
        levels = len(self.downsample_factors)
        fmaps = [num_fmaps * fmap_inc_factor**level for level in range(levels + 1)]

        def chain(cin: int, cout: int) -> ConvChain:
            return ConvChain(conv, cin, cout, count=2, padding=padding, norm=norm, act=act)

        self.down = nn.ModuleList()
        self.pools = nn.ModuleList()
        channels = in_channels
        for level in range(levels):
            self.down.append(chain(channels, fmaps[level]))
            self.pools.append(MaxPool3d(self.downsample_factors[level]))
            channels = fmaps[level]
        self.bottom = chain(channels, fmaps[levels])
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        for level in reversed(range(levels)):
            factor = self.downsample_factors[level]
            self.ups.append(nn.ConvTranspose3d(fmaps[level + 1], fmaps[level], factor, stride=factor))
            self.up_convs.append(chain(2 * fmaps[level], fmaps[level]))
        self.head = nn.Conv3d(fmaps[0], out_channels, 1)
        self.final = nn.Sigmoid() if final_activation == "sigmoid" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for down, pool in zip(self.down, self.pools):
            x = down(x)
            skips.append(x)
            x = pool(x)
        x = self.bottom(x)
        for up, up_conv, skip in zip(self.ups, self.up_convs, reversed(skips)):
            x = up(x)
            if self.padding == "valid":
                skip = center_crop(skip, x.shape[2:])
            x = up_conv(torch.cat([skip, x], dim=1))
        return self.final(self.head(x))

    def output_shape(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Spatial output shape for a spatial input shape: a forward pass of a copy on
        the meta device, so it costs neither memory nor arithmetic."""
        clone = copy.deepcopy(self).to("meta")
        probe = torch.empty((1, self.in_channels, *input_shape), device="meta")
        return tuple(clone(probe).shape[2:])


@register_model("unet3d", in_channels=1, out_channels=3)
def unet3d(conv: ConvBuilder, **options) -> UNet3d:
    return UNet3d(conv, **options)
