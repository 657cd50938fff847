"""3D ResNet-18/34 for clip or volume classification, the video backbone of the
PmSCn paper (section 4.1), in the shape of torchvision's ``r3d_18``.

The stem's (3, 7, 7) convolution is not a 3x3x3 convolution and stays plain. In a
basic block the two 3x3x3 convolutions become one ``p{m}sc{n}`` block when n >= 2
(the block carries the stride), followed by batch norm, the residual addition and
ReLU.
"""

from __future__ import annotations

import torch
from torch import nn

from .conv_registry import ConvBuilder
from .layers import ConvChain, act_layer, norm_layer
from .model_registry import register_model

DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    def __init__(self, conv: ConvBuilder, in_channels: int, channels: int, stride: int, norm, act) -> None:
        super().__init__()
        self.body = ConvChain(conv, in_channels, channels, count=2, stride=stride, norm=norm, act=act,
                              bias=False, last_act=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv3d(in_channels, channels, 1, stride=stride, bias=False),
                                          *norm_layer(norm, channels))
        self.act = nn.Sequential(*act_layer(act))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ResNet3d(nn.Module):
    def __init__(
        self,
        conv: ConvBuilder,
        in_channels: int = 3,
        out_channels: int = 101,
        depth: int = 18,
        width: int = 64,
        norm=("batch", {}),
        act=("relu", {"inplace": True}),
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, width, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            *norm_layer(norm, width), *act_layer(act),
        )
        stages = []
        channels = width
        for i, blocks in enumerate(DEPTHS[depth]):
            planes = width * 2**i
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(conv, channels, planes, stride, norm, act)]
            stage += [BasicBlock(conv, planes, planes, 1, norm, act) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            channels = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


@register_model("resnet3d", in_channels=3, out_channels=101)
def resnet3d(conv: ConvBuilder, **options) -> ResNet3d:
    return ResNet3d(conv, **options)
