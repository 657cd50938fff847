"""Parallel Separable 3D Convolution, the PmSCn block (Gonda et al., BMVC 2018).

A PmSCn block stands in for one or several consecutive 3x3x3 convolutions. It runs
``m`` parallel streams; stream ``s`` applies ``n`` 2D convolutions in one plane
(ReLU after each) and then one 1D convolution along the axis that plane leaves out.
The streams are concatenated on the channel axis, so the block is a drop-in
replacement for ``nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding)``.

Width rule (the paper's Eq. 5 and the sentence after it)
--------------------------------------------------------
Eq. 5 gives the sub-space width ``M`` for which one (2D + 1D) pair has as many
weights as the ``d x d x d`` convolution it replaces::

    M = k_i * k_{i-1} * d^3 / (k_{i-1} * d^2 + k_i * d)

with ``k_{i-1} = in_channels``, ``k_i = out_channels`` and ``d = kernel_size``. The
paper then "scales M by 1/s so that the sub-space filters are evenly distributed
across the streams". The paper does not say whether ``M`` is rounded, nor how ``n``
enters. psc's reading, fixed here and tested:

* ``M`` is computed once per block from its own in/out channels (not per 2D conv),
  rounded to the nearest integer, at least ``m``;
* ``M`` is the total width over all streams and is split evenly over the ``m``
  streams (remainder to the first), exactly as the output channels are;
* every 2D convolution of a stream has that stream's width ``M_s`` (the first maps
  ``in_channels -> M_s``, the following ``n - 1`` map ``M_s -> M_s``), and the 1D
  convolution maps ``M_s -> out_s``.

So a block costs ``in*M*d^2 + (n-1)*sum(M_s^2)*d^2 + sum(M_s*out_s)*d`` weights; for
``m = 1, n = 1`` that is (up to rounding) the Conv3d's count, for ``m > 1`` it is
less, and every extra 2D convolution adds ``M_s^2 d^2`` per stream. ``mid_channels``
overrides ``M``.

Padding: ``padding=kernel_size // 2`` (the default) gives Conv3d's "same" output.
``padding=0`` gives the output of ``n`` chained *valid* Conv3d's: in-plane each 2D
conv trims ``d - 1``, and the 1D axis, trimmed only once by its 1D conv, is
centre-cropped by the remaining ``(n - 1)(d - 1)`` so all streams agree. Stride is
applied once per axis (the first 2D conv strides the plane, the 1D conv its axis),
so the output size equals a Conv3d's with the same stride.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .conv_args import triple

# Stream planes in the order the API promises: the 2D kernel shape and the axis
# (0 = depth/z, 1 = height/y, 2 = width/x) its 1D convolution runs along.
STREAM_AXES = (0, 1, 2)


def split_evenly(total: int, parts: int) -> list[int]:
    """Split ``total`` channels over ``parts`` streams, remainder to the first."""
    base, remainder = divmod(total, parts)
    return [base + remainder] + [base] * (parts - 1)


def subspace_width(in_channels: int, out_channels: int, kernel_size: int = 3, m: int = 1) -> int:
    """Total sub-space width ``M`` of a block by Eq. 5 of the paper (see module doc)."""
    d = kernel_size
    width = in_channels * out_channels * d**3 / (in_channels * d * d + out_channels * d)
    return max(m, int(round(width)))


def _kernel(axis: int, size: int, planar: bool) -> tuple[int, int, int]:
    """The 3D kernel shape of a stream's 2D (``planar``) or 1D convolution."""
    if planar:
        return tuple(1 if a == axis else size for a in range(3))  # type: ignore[return-value]
    return tuple(size if a == axis else 1 for a in range(3))  # type: ignore[return-value]


class SeparableStream(nn.Module):
    """One stream: ``n`` 2D convolutions in the plane orthogonal to ``axis``, ReLU
    after each, then a 1D convolution along ``axis``."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        axis: int,
        n: int,
        kernel_size: int,
        stride: tuple[int, int, int],
        padding: int,
        bias: bool,
    ) -> None:
        super().__init__()
        self.axis = axis
        plane_kernel = _kernel(axis, kernel_size, planar=True)
        line_kernel = _kernel(axis, kernel_size, planar=False)
        plane_pad = tuple(0 if a == axis else padding for a in range(3))
        line_pad = tuple(padding if a == axis else 0 for a in range(3))
        plane_stride = tuple(1 if a == axis else stride[a] for a in range(3))
        line_stride = tuple(stride[a] if a == axis else 1 for a in range(3))

        layers: list[nn.Module] = []
        channels = in_channels
        for i in range(n):
            layers.append(
                nn.Conv3d(
                    channels,
                    mid_channels,
                    plane_kernel,
                    stride=plane_stride if i == 0 else 1,
                    padding=plane_pad,
                    bias=bias,
                )
            )
            layers.append(nn.ReLU(inplace=True))
            channels = mid_channels
        self.planar = nn.Sequential(*layers)
        self.line = nn.Conv3d(mid_channels, out_channels, line_kernel, stride=line_stride, padding=line_pad, bias=bias)
        # Valid mode: the 1D axis was trimmed once, the plane n times; crop to agree.
        self.crop = (n - 1) * (kernel_size - 1) // 2 if padding == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.line(self.planar(x))
        if self.crop:
            length = y.shape[2 + self.axis] - 2 * self.crop
            y = y.narrow(2 + self.axis, self.crop, length)
        return y


class PmSCn(nn.Module):
    """Parallel separable 3D convolution: ``m`` streams of ``n`` 2D + one 1D conv.

    Call signature matches ``nn.Conv3d`` where it overlaps, so backbones and
    :func:`psc.models.replace_conv3d` can swap it in. ``convs_per_block`` tells a
    backbone how many consecutive plain 3x3x3 convolutions one block stands for.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        m: int = 2,
        n: int = 2,
        kernel_size: int = 3,
        stride: int | Sequence[int] = 1,
        mid_channels: int | None = None,
        bias: bool = True,
        padding: int | str | None = None,
    ) -> None:
        super().__init__()
        if m not in (1, 2, 3):
            raise ValueError(f"m (parallel streams) must be 1, 2 or 3, got {m}")
        if n < 1:
            raise ValueError(f"n (2D convolutions per stream) must be >= 1, got {n}")
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if out_channels < m:
            raise ValueError(f"out_channels ({out_channels}) must be at least m ({m})")
        same = kernel_size // 2
        if padding is None or padding == "same":
            padding = same
        elif padding == "valid":
            padding = 0
        if padding not in (0, same):
            raise ValueError(f"padding must be 'same' ({same}) or 'valid' (0), got {padding}")

        self.in_channels, self.out_channels = in_channels, out_channels
        self.m, self.n, self.kernel_size = m, n, kernel_size
        self.stride = triple(stride, "stride")
        self.padding = padding
        total_mid = subspace_width(in_channels, out_channels, kernel_size, m) if mid_channels is None else mid_channels
        if total_mid < m:
            raise ValueError(f"mid_channels ({total_mid}) must be at least m ({m})")
        self.mid_channels = total_mid
        self.streams = nn.ModuleList(
            SeparableStream(in_channels, mid, out, axis, n, kernel_size, self.stride, padding, bias)
            for axis, mid, out in zip(STREAM_AXES[:m], split_evenly(total_mid, m), split_evenly(out_channels, m))
        )

    @property
    def convs_per_block(self) -> int:
        return self.n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.streams) == 1:
            return self.streams[0](x)
        return torch.cat([stream(x) for stream in self.streams], dim=1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, m={self.m}, n={self.n}, "
            f"kernel_size={self.kernel_size}, stride={self.stride}, mid_channels={self.mid_channels}, "
            f"padding={'same' if self.padding else 'valid'}"
        )
