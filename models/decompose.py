"""Section 3.1 of the PmSCn paper made real: a trained 3x3x3 convolution written as a
sum of separable (2D then 1D) streams along the three axes.

Steps (Eqs. 2-3 of the paper):

1. HOSVD of the kernel over its three spatial modes: ``W = S x_z Uz x_y Uy x_x Ux``
   with 3x3 orthogonal factors and a core ``S`` that keeps the channel modes.
2. The core is cut into slices ``S^{alpha, beta}`` (all entries whose index along
   axis ``alpha`` is ``beta``); each slice, mapped back, is a kernel separable along
   ``alpha``: a 1D filter along ``alpha`` times a 2D kernel in the other plane.
   Slices are taken greedily by the energy they still hold; ``rank`` is how many.
   Because the HOSVD factors are orthogonal, the energy left out is exactly the
   squared error of the kernel, so error never rises with rank and is zero once
   every core entry is covered.
3. The slices taken along one axis are summed into that axis's stream kernel, and
   an SVD of its (out x d, in x d x d) unfolding gives the narrowest exact 2D conv
   (in -> R) plus 1D conv (R -> out) pair.

The result, :class:`SeparableConv3d`, is *linear* (streams summed, no ReLU), so at
full rank it computes what the Conv3d computed; its streams can be fine-tuned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_AXIS_NAMES = "zyx"


class LinearStream(nn.Module):
    """2D convolution in the plane orthogonal to ``axis``, then 1D along ``axis``;
    no bias on the 2D part, so zero padding composes exactly."""

    def __init__(self, axis: int, planar: torch.Tensor, line: torch.Tensor, stride, padding) -> None:
        super().__init__()
        self.axis = axis
        self.planar = nn.Parameter(planar)
        self.line = nn.Parameter(line)
        self.plane_stride = tuple(1 if a == axis else stride[a] for a in range(3))
        self.line_stride = tuple(stride[a] if a == axis else 1 for a in range(3))
        self.plane_pad = tuple(0 if a == axis else padding[a] for a in range(3))
        self.line_pad = tuple(padding[a] if a == axis else 0 for a in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv3d(x, self.planar, stride=self.plane_stride, padding=self.plane_pad)
        return F.conv3d(y, self.line, stride=self.line_stride, padding=self.line_pad)

    def kernel(self) -> torch.Tensor:
        """The equivalent full 3D kernel, (out, in, d, d, d)."""
        planar = self.planar.squeeze(2 + self.axis)  # (R, in, a, b)
        line = self.line.flatten(2)  # (out, R, d)
        full = torch.einsum("orl,riab->oilab", line, planar)  # 1D index first
        order = {0: (0, 1, 2, 3, 4), 1: (0, 1, 3, 2, 4), 2: (0, 1, 3, 4, 2)}[self.axis]
        return full.permute(order)


class SeparableConv3d(nn.Module):
    """Sum of separable streams standing for one Conv3d (see module docstring)."""

    def __init__(self, streams: list[LinearStream], bias: torch.Tensor | None, relative_error: float,
                 rank: int, slices: list[tuple[str, int]]) -> None:
        super().__init__()
        self.streams = nn.ModuleList(streams)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.relative_error = relative_error
        self.rank = rank
        self.slices = slices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.streams[0](x)
        for stream in self.streams[1:]:
            out = out + stream(x)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1, 1, 1)
        return out

    def kernel(self) -> torch.Tensor:
        return sum(stream.kernel() for stream in self.streams)

    def extra_repr(self) -> str:
        widths = ", ".join(f"{_AXIS_NAMES[s.axis]}:{s.planar.shape[0]}" for s in self.streams)
        return f"rank={self.rank}, streams=({widths}), relative_error={self.relative_error:.3g}"


def _mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """Multiply spatial mode ``mode`` (0..2, tensor dims 2..4) by ``matrix``."""
    moved = tensor.movedim(2 + mode, -1)
    return (moved @ matrix.T).movedim(-1, 2 + mode)


def _greedy_slices(core: torch.Tensor, rank: int | None) -> list[tuple[int, int, torch.Tensor]]:
    """Cover the core's spatial index cube with slices, largest remaining energy first."""
    energy = core.pow(2).sum(dim=(0, 1))  # (d, d, d)
    covered = torch.zeros_like(energy, dtype=torch.bool)
    chosen = []
    limit = rank if rank is not None else energy.numel()
    while len(chosen) < limit and not bool(covered.all()):
        best = None
        for axis in range(3):
            for index in range(energy.shape[axis]):
                mask = torch.zeros_like(covered)
                mask.select(axis, index).fill_(True)
                mask &= ~covered
                value = float(energy[mask].sum())
                if best is None or value > best[0] or (value == best[0] and mask.sum() > best[3].sum()):
                    best = (value, axis, index, mask)
        _, axis, index, mask = best
        covered |= mask
        chosen.append((axis, index, mask))
    return chosen


def decompose_conv3d(conv3d: nn.Conv3d, rank: int | None = None, tol: float = 1e-7) -> SeparableConv3d:
    """Turn a trained ``nn.Conv3d`` (cubic kernel, no groups/dilation) into a linear
    parallel-separable module. ``rank`` = number of core slices kept; ``None`` keeps
    all (exact). ``relative_error`` on the result is ||W - W_hat|| / ||W||."""
    if conv3d.groups != 1 or tuple(conv3d.dilation) != (1, 1, 1) or conv3d.padding_mode != "zeros":
        raise ValueError("decompose_conv3d needs a Conv3d without groups or dilation, with zero padding")
    if isinstance(conv3d.padding, str):
        raise ValueError("give the Conv3d numeric padding")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    weight = conv3d.weight.detach().to(torch.float64)
    out_ch, in_ch, *ks = weight.shape
    factors = []
    for mode in range(3):
        unfolding = weight.movedim(2 + mode, 0).reshape(ks[mode], -1)
        u, _, _ = torch.linalg.svd(unfolding, full_matrices=True)
        factors.append(u)
    core = weight
    for mode in range(3):
        core = _mode_product(core, factors[mode].T, mode)

    slices = _greedy_slices(core, rank)
    streams = []
    approx = torch.zeros_like(weight)
    for axis in range(3):
        masks = [mask for a, _, mask in slices if a == axis]
        if not masks:
            continue
        mask = torch.stack(masks).any(dim=0)
        part = core * mask
        for mode in range(3):
            part = _mode_product(part, factors[mode], mode)
        approx += part
        # (out * d_axis) x (in * plane) unfolding -> narrowest exact 2D + 1D pair.
        d = ks[axis]
        unfolding = part.movedim(2 + axis, 1).reshape(out_ch * d, -1)
        u, s, vh = torch.linalg.svd(unfolding, full_matrices=False)
        keep = max(1, int((s > tol * s[0]).sum())) if s[0] > 0 else 1
        plane_shape = [k for a, k in enumerate(ks) if a != axis]
        planar = vh[:keep].reshape(keep, in_ch, *plane_shape).unsqueeze(2 + axis)
        line = (u[:, :keep] * s[:keep]).reshape(out_ch, d, keep).permute(0, 2, 1)
        line_shape = [out_ch, keep, 1, 1, 1]
        line_shape[2 + axis] = d
        dtype = conv3d.weight.dtype
        streams.append(LinearStream(axis, planar.to(dtype).contiguous(), line.reshape(line_shape).to(dtype).contiguous(),
                                    tuple(conv3d.stride), tuple(conv3d.padding)))
    error = float(torch.linalg.vector_norm(weight - approx) / torch.linalg.vector_norm(weight).clamp_min(1e-30))
    bias = conv3d.bias.detach().clone() if conv3d.bias is not None else None
    module = SeparableConv3d(streams, bias, error, len(slices), [(_AXIS_NAMES[a], i) for a, i, _ in slices])
    return module.to(conv3d.weight.device)
