"""3D DenseNet for brain tissue segmentation (Bui, Shin & Moon 2017, arXiv:1709.03199),
the MRI backbone of the PmSCn paper (section 4.2).

Shape: a stem of 3x3x3 convolutions at full resolution; dense blocks whose layers
(BN-ReLU-conv) each add ``growth_rate`` feature maps; transitions that compress
with a 1x1x1 convolution and halve the resolution with a strided 3x3x3
convolution (Bui et al. use strided convolutions instead of pooling); a side output
per dense block, upsampled to full resolution, all concatenated before a 1x1x1
classifier. As in the PmSCn paper's reproduction the upsampling is plain
(trilinear) rather than learned deconvolution.

Input sizes: each transition halves the grid (rounding up), and the side outputs are
upsampled back to the input's size. That is exact only when every size is a multiple
of ``size_divisor`` (2 per transition): for other sizes the coarse side outputs would be
stretched by a fraction of a voxel and land beside the anatomy (whole-scan inference of
an IBSR crop of 148 x 123 x 144 voxels lost 0.009 mean Dice that way). So ``forward``
zero-pads the input at the far end of each axis up to the next multiple, which keeps
voxel 0 where it is, and crops the output back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .conv_registry import ConvBuilder
from .layers import ConvChain, act_layer, full_precision, norm_layer
from .model_registry import register_model


class _DenseLayer(nn.Sequential):
    def __init__(self, conv: ConvBuilder, in_channels: int, growth_rate: int, norm, act) -> None:
        super().__init__(*norm_layer(norm, in_channels), *act_layer(act),
                         conv(in_channels, growth_rate, 3, padding=1, bias=False))


class _DenseBlock(nn.Module):
    def __init__(self, conv: ConvBuilder, in_channels: int, layers: int, growth_rate: int, norm, act) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            _DenseLayer(conv, in_channels + i * growth_rate, growth_rate, norm, act) for i in range(layers)
        )
        self.out_channels = in_channels + layers * growth_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))
        return torch.cat(features, dim=1)


class _Transition(nn.Sequential):
    def __init__(self, conv: ConvBuilder, in_channels: int, out_channels: int, norm, act) -> None:
        super().__init__(
            *norm_layer(norm, in_channels), *act_layer(act),
            nn.Conv3d(in_channels, out_channels, 1, bias=False),
            *norm_layer(norm, out_channels), *act_layer(act),
            conv(out_channels, out_channels, 3, stride=2, padding=1, bias=False),
        )


class _SideOutput(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, norm, act) -> None:
        super().__init__(*norm_layer(norm, in_channels), *act_layer(act), nn.Conv3d(in_channels, out_channels, 1))


class DenseNet3d(nn.Module):
    def __init__(
        self,
        conv: ConvBuilder,
        in_channels: int = 1,
        out_channels: int = 4,
        init_channels: int = 24,
        stem_convs: int = 2,
        growth_rate: int = 12,
        block_layers: tuple[int, ...] = (4, 4, 4, 4),
        compression: float = 1.0,
        side_channels: int = 8,
        norm=("batch", {}),
        act=("relu", {"inplace": True}),
    ) -> None:
        super().__init__()
        self.stem = ConvChain(conv, in_channels, init_channels, count=stem_convs, norm=norm, act=act, bias=False)
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.sides = nn.ModuleList()
        channels = init_channels
        for i, layers in enumerate(block_layers):
            block = _DenseBlock(conv, channels, layers, growth_rate, norm, act)
            self.blocks.append(block)
            channels = block.out_channels
            self.sides.append(_SideOutput(channels, side_channels, norm, act))
            if i < len(block_layers) - 1:
                reduced = max(1, int(channels * compression))
                self.transitions.append(_Transition(conv, channels, reduced, norm, act))
                channels = reduced
        self.classifier = nn.Conv3d(side_channels * len(block_layers), out_channels, 1)
        self.size_divisor = 2 ** len(self.transitions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        pad = [(-s) % self.size_divisor for s in size]
        if any(pad):  # F.pad lists the last axis first: (x_low, x_high, y_low, y_high, ...)
            x = F.pad(x, [v for p in reversed(pad) for v in (0, p)])
        padded = x.shape[2:]
        first, *rest = self.stem  # the first convolution sees raw intensities: fp32
        x = full_precision(first, x)
        for layer in rest:
            x = layer(x)
        logits = None
        for i, block in enumerate(self.blocks):
            x = block(x)
            part = full_precision(lambda features: self._classify_side(i, features), x, keep_dtype=False)
            if i > 0:
                part = F.interpolate(part, size=padded, mode="trilinear", align_corners=False)
            logits = part if logits is None else logits + part
            if i < len(self.transitions):
                x = self.transitions[i](x)
        logits = logits + self.classifier.bias.view(1, -1, 1, 1, 1)
        return logits[:, :, : size[0], : size[1], : size[2]] if any(pad) else logits

    def _classify_side(self, i: int, features: torch.Tensor) -> torch.Tensor:
        """Block ``i``'s share of the class logits, at the block's own resolution.

        The classifier is a 1x1x1 convolution over the concatenated, upsampled side
        outputs. It and trilinear upsampling are both linear, so classifying each side
        output first and upsampling the class maps (4 channels, not 8) is the same sum,
        with half the upsampling and no full-resolution concatenation; it runs in fp32
        (``full_precision``)."""
        side = self.sides[i](features)
        width = side.shape[1]
        return F.conv3d(side, self.classifier.weight[:, i * width:(i + 1) * width])


@register_model("densenet3d", in_channels=1, out_channels=4)
def densenet3d(conv: ConvBuilder, **options) -> DenseNet3d:
    return DenseNet3d(conv, **options)
