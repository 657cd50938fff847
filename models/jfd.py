"""Joint spatio-temporal filter decomposition (Z. Miao et al., NeurIPS 2021,
"Spatiotemporal Joint Filter Decomposition in 3D Convolutional Neural Networks").

Every 3D filter of a layer is written over two small sets of *atoms* shared by the whole
layer: ``A`` axial atoms ``T_a`` (1D, length ``k`` along one axis: time in a video, z
in a volume) and ``B`` planar atoms ``S_b`` (2D, ``k x k`` in the other two axes)::

    W[o, i] = sum_{a, b} C[o, i, a, b] * (T_a outer S_b)

so the layer is three convolutions: every input channel convolved with each axial atom
(``in * A`` maps), each of those with each planar atom (``in * A * B`` maps), and a
1x1x1 convolution with the joint coefficients ``C`` (``out x in*A*B``). All three are
convolutions, and the function is the 3D convolution with the kernel above
(:meth:`JointFilterDecomposition.equivalent_kernel`).

Why psc wants it: it separates what a layer learns along the axial axis from what it
learns in-plane *without* giving up the joint dependency (every (a, b) pair has its own
coefficient, unlike a 2D-then-1D chain), and the atoms can be swapped without touching
the coefficients.

Atom counts
-----------
``axial_atoms`` (``A``) and ``planar_atoms`` (``B``). With the full sets (``A = k``,
``B = k^2``: 3 x 9 for 3x3x3) the products ``T_a outer S_b`` are a basis of all
``k x k x k`` kernels whenever the atoms are linearly independent, so the layer spans
every Conv3d; :meth:`~JointFilterDecomposition.load_conv3d` (or
:meth:`~JointFilterDecomposition.from_conv3d`) then reproduces a given Conv3d exactly.
psc's **default is 2 axial x 6 planar atoms** (``"jfd"``; ``"jfd{A}x{B}"`` names any
other, e.g. ``"jfd3x9"``): two thirds of each basis, 12 of the 27 products, so the layer
has 0.44x the Conv3d's coefficients. The paper learns the atoms; the counts are psc's
choice (the paper's point is the decomposition and atom swapping, not one count).

Parameter rule
--------------
With axial atom length ``ka``, planar atoms ``kh x kw``::

    parameters = A*ka + B*kh*kw + out*in*A*B + out (bias)

and, at stride 1 with "same" padding, the multiply-accumulates per output voxel are
``in*A*ka + in*A*B*kh*kw + in*A*B*out``: the coefficients dominate, about ``A*B/27`` of a
3x3x3 Conv3d's ``in*out*27``. The price is memory: between the convolutions the layer
holds ``in*A`` and then ``in*A*B`` maps per voxel (12x its input at the default).

Atom swapping
-------------
The paper's "atom swapping": replace one set of atoms by another of the same number but
a different size (or dilation) and keep everything else. :meth:`dilate_axial` dilates
the axial atoms only (the paper's tempo-invariance: the same temporal pattern at a slower
pace), :meth:`swap_atoms` puts in atoms of any odd size. Padding follows so the output
size stays what it was (the layer's nominal ``padding`` refers to ``kernel_size``;
a footprint ``e`` wider than it gets ``(e - k) / 2`` more). :meth:`set_atoms_trainable`
fixes one set while the other learns, the paper's alternating temporal / spatial stages
(its downsampled-data schedule itself is a training recipe, not part of the layer).

Stride is taken once per axis: the axial convolution strides its axis, the planar one
the plane, so output sizes equal a Conv3d's with the same stride, padding and input,
odd sizes included.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .conv_args import resolve_padding, triple

DEFAULT_AXIAL_ATOMS = 2
DEFAULT_PLANAR_ATOMS = 6


def conv_padding(conv: nn.Conv3d) -> tuple[int, int, int]:
    """A Conv3d's padding as three ints ("same" and "valid" resolved)."""
    return resolve_padding(conv.padding if isinstance(conv.padding, str) else tuple(conv.padding), tuple(conv.kernel_size))


def _orthonormal_rows(count: int, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``count`` atoms of ``size`` taps, orthonormal as far as ``size`` allows (random
    directions; beyond ``size`` atoms the extra ones are random unit vectors). Orthonormal
    atoms give the coefficients the scale of a Conv3d's weights at initialisation."""
    rows = []
    while len(rows) < count:
        block = torch.linalg.qr(torch.randn(size, size, generator=generator))[0].T
        rows.extend(block[: count - len(rows)])
    return torch.stack(rows)


def jfd_parameters(in_channels: int, out_channels: int, axial_atoms: int, planar_atoms: int,
                   axial_size: int = 3, planar_size: tuple[int, int] = (3, 3), bias: bool = True) -> int:
    """The parameter rule of the module doc."""
    a, b = axial_atoms, planar_atoms
    return a * axial_size + b * math.prod(planar_size) + out_channels * in_channels * a * b + (out_channels if bias
                                                                                                 else 0)


class JointFilterDecomposition(nn.Module):
    """A 3D convolution as axial atoms, planar atoms and joint coefficients (module doc).

    Call signature matches ``nn.Conv3d`` where it overlaps (no dilation, no groups).
    ``axis`` is the axial axis (0 = depth/z/time, 1 = y, 2 = x).
    """

    convs_per_block = 1

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] | str | None = None,
        bias: bool = True,
        axial_atoms: int = DEFAULT_AXIAL_ATOMS,
        planar_atoms: int = DEFAULT_PLANAR_ATOMS,
        axis: int = 0,
        axial_dilation: int = 1,
    ) -> None:
        super().__init__()
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        if axial_atoms < 1 or planar_atoms < 1:
            raise ValueError(f"atom counts must be positive, got {axial_atoms} axial, {planar_atoms} planar")
        if axial_dilation < 1:
            raise ValueError(f"axial_dilation must be positive, got {axial_dilation}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = triple(kernel_size, "kernel_size")
        if any(k < 1 or k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        self.stride = triple(stride, "stride")
        self.padding = resolve_padding(padding, self.kernel_size)
        self.axis = axis
        self.plane_axes = tuple(a for a in range(3) if a != axis)
        self.axial_dilation = int(axial_dilation)
        self.axial = nn.Parameter(_orthonormal_rows(axial_atoms, self.kernel_size[axis]))
        planar_shape = tuple(self.kernel_size[a] for a in self.plane_axes)
        self.planar = nn.Parameter(_orthonormal_rows(planar_atoms, math.prod(planar_shape)).view(planar_atoms,
                                                                                               *planar_shape))
        self.coefficients = nn.Conv3d(in_channels * axial_atoms * planar_atoms, out_channels, 1, bias=bias)

    # --- geometry ------------------------------------------------------------------------

    @property
    def axial_atoms(self) -> int:
        return self.axial.shape[0]

    @property
    def planar_atoms(self) -> int:
        return self.planar.shape[0]

    def _axial_footprint(self) -> int:
        return self.axial_dilation * (self.axial.shape[1] - 1) + 1

    def _geometry(self, axes: Sequence[int], sizes: Sequence[int]) -> tuple[list[int], list[int]]:
        """(conv padding, input crop) on the whole grid for atoms of footprint ``sizes``
        on ``axes``: the nominal padding plus half the footprint's growth over
        ``kernel_size``; a negative result crops instead. Other axes: 0, 0."""
        pads, crops = [0, 0, 0], [0, 0, 0]
        for axis, size in zip(axes, sizes):
            q = self.padding[axis] + (size - self.kernel_size[axis]) // 2
            pads[axis], crops[axis] = max(q, 0), max(-q, 0)
        return pads, crops

    # --- the three convolutions ----------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis, (p, q) = self.axis, self.plane_axes
        a_count, b_count = self.axial_atoms, self.planar_atoms
        # 1. axial atoms: every input channel with each atom (in -> in*A), stride on the axis.
        shape = [1, 1, 1]
        shape[axis] = self.axial.shape[1]
        axial = self.axial.view(a_count, 1, *shape).repeat(self.in_channels, 1, 1, 1, 1)
        pads, crops = self._geometry([axis], [self._axial_footprint()])
        x = _crop(x, crops)
        stride = [1, 1, 1]
        stride[axis] = self.stride[axis]
        dilation = [1, 1, 1]
        dilation[axis] = self.axial_dilation
        x = F.conv3d(x, axial, None, stride, pads, dilation, groups=self.in_channels)
        # 2. planar atoms: each of those with each atom (in*A -> in*A*B), stride in-plane.
        shape = [1, 1, 1]
        shape[p], shape[q] = self.planar.shape[1], self.planar.shape[2]
        planar = self.planar.view(b_count, 1, *shape).repeat(self.in_channels * a_count, 1, 1, 1, 1)
        pads, crops = self._geometry([p, q], self.planar.shape[1:])
        x = _crop(x, crops)
        stride = [1, 1, 1]
        stride[p], stride[q] = self.stride[p], self.stride[q]
        x = F.conv3d(x, planar, None, stride, pads, 1, groups=self.in_channels * a_count)
        # 3. joint coefficients: 1x1x1 over the in*A*B maps (channel i*A*B + a*B + b).
        return self.coefficients(x)

    def coefficient_tensor(self) -> torch.Tensor:
        """``C`` as (out, in, A, B) (a view of the 1x1x1 convolution's weight)."""
        return self.coefficients.weight.view(self.out_channels, self.in_channels, self.axial_atoms,
                                             self.planar_atoms)

    def equivalent_kernel(self) -> torch.Tensor:
        """The (out, in, kz, ky, kx) kernel of the 3D convolution this layer computes
        (dilated axial atoms spread out with zeros between their taps)."""
        d = self.axial_dilation
        atoms = self.axial.new_zeros(self.axial_atoms, self._axial_footprint())
        atoms[:, ::d] = self.axial
        full = torch.einsum("oiab,at,bhw->oithw", self.coefficient_tensor(), atoms, self.planar)
        return full.movedim(2, 2 + self.axis)

    # --- setting the layer from a Conv3d -------------------------------------------------

    @torch.no_grad()
    def load_conv3d(self, conv: nn.Conv3d, fit_atoms: bool = True) -> float:
        """Set the layer so it computes ``conv`` (or the closest it can).

        ``fit_atoms=True``: the atoms become the leading singular vectors of the kernel's
        axial and planar unfoldings (a truncated HOSVD: with the full sets an orthonormal
        basis of each mode, so the reproduction is exact); ``False`` keeps the current
        atoms. Then the coefficients are the least-squares fit of the kernel on the atom
        products (exact whenever those span the kernel space). Returns the relative kernel
        error ||W - W'|| / ||W||."""
        if type(conv) is not nn.Conv3d:
            raise TypeError(f"expected an nn.Conv3d, got {type(conv).__name__}")
        atom_kernel = [0, 0, 0]
        atom_kernel[self.axis] = self.axial.shape[1]
        atom_kernel[self.plane_axes[0]], atom_kernel[self.plane_axes[1]] = self.planar.shape[1:]
        same = (conv.in_channels == self.in_channels and conv.out_channels == self.out_channels
                and tuple(conv.kernel_size) == self.kernel_size == tuple(atom_kernel) and self.axial_dilation == 1
                and tuple(conv.stride) == self.stride and conv_padding(conv) == self.padding
                and tuple(conv.dilation) == (1, 1, 1)
                and conv.groups == 1 and conv.padding_mode == "zeros")
        if not same:
            raise ValueError(f"{conv} does not have this layer's geometry ({self.extra_repr()})")
        weight = conv.weight.detach().to(torch.float64).movedim(2 + self.axis, 2)  # (o, i, t, h, w)
        ka, kh, kw = weight.shape[2:]
        if fit_atoms:
            axial = torch.linalg.svd(weight.permute(2, 0, 1, 3, 4).reshape(ka, -1), full_matrices=False)[0].T
            planar = torch.linalg.svd(weight.permute(3, 4, 0, 1, 2).reshape(kh * kw, -1), full_matrices=False)[0].T
            self.axial.copy_(_pad_rows(axial, self.axial_atoms))
            self.planar.copy_(_pad_rows(planar, self.planar_atoms).view(self.planar_atoms, kh, kw))
        atoms_t = self.axial.detach().to(torch.float64)
        atoms_s = self.planar.detach().to(torch.float64).flatten(1)
        basis = torch.einsum("at,bs->abts", atoms_t, atoms_s).reshape(self.axial_atoms * self.planar_atoms, -1)
        flat = weight.reshape(self.out_channels * self.in_channels, -1)
        coefficients = flat @ torch.linalg.pinv(basis)
        self.coefficients.weight.copy_(coefficients.reshape(self.coefficients.weight.shape))
        if self.coefficients.bias is not None:
            if conv.bias is not None:
                self.coefficients.bias.copy_(conv.bias)
            else:
                self.coefficients.bias.zero_()
        error = (flat - coefficients @ basis).norm() / flat.norm().clamp_min(1e-300)
        return float(error)

    @classmethod
    def from_conv3d(cls, conv: nn.Conv3d, axial_atoms: int | None = None, planar_atoms: int | None = None,
                    axis: int = 0) -> "JointFilterDecomposition":
        """A layer computing ``conv``: full atom sets by default (exact), fewer for an
        approximation (see :meth:`load_conv3d`)."""
        kernel = tuple(conv.kernel_size)
        plane = [kernel[a] for a in range(3) if a != axis]
        layer = cls(conv.in_channels, conv.out_channels, kernel, conv.stride, conv_padding(conv),
                    bias=conv.bias is not None, axial_atoms=axial_atoms or kernel[axis],
                    planar_atoms=planar_atoms or math.prod(plane), axis=axis)
        layer.to(device=conv.weight.device, dtype=conv.weight.dtype)
        layer.load_conv3d(conv)
        return layer

    # --- atom swapping -------------------------------------------------------------------

    def dilate_axial(self, dilation: int) -> "JointFilterDecomposition":
        """Dilate the axial atoms (same atoms, taps ``dilation`` apart); coefficients and
        planar atoms unchanged, output size unchanged. Returns the layer."""
        if dilation < 1:
            raise ValueError(f"dilation must be positive, got {dilation}")
        self.axial_dilation = int(dilation)
        return self

    @torch.no_grad()
    def swap_atoms(self, axial: torch.Tensor | None = None, planar: torch.Tensor | None = None
                   ) -> "JointFilterDecomposition":
        """Put in other atoms of the same number (any odd size): ``axial`` (A, ka'),
        ``planar`` (B, kh', kw'). Coefficients unchanged; output size unchanged."""
        if axial is not None:
            if axial.dim() != 2 or axial.shape[0] != self.axial_atoms or axial.shape[1] % 2 == 0:
                raise ValueError(f"axial atoms must be ({self.axial_atoms}, odd size), got {tuple(axial.shape)}")
            self.axial = nn.Parameter(axial.detach().to(self.axial).clone(), self.axial.requires_grad)
        if planar is not None:
            if planar.dim() != 3 or planar.shape[0] != self.planar_atoms or any(s % 2 == 0 for s in planar.shape[1:]):
                raise ValueError(f"planar atoms must be ({self.planar_atoms}, odd, odd), got {tuple(planar.shape)}")
            self.planar = nn.Parameter(planar.detach().to(self.planar).clone(), self.planar.requires_grad)
        return self

    def set_atoms_trainable(self, axial: bool = True, planar: bool = True) -> "JointFilterDecomposition":
        """Fix one atom set while the other (and the coefficients) learn: the paper's
        temporal stage is ``axial=True, planar=False``, its spatial stage the reverse."""
        self.axial.requires_grad_(axial)
        self.planar.requires_grad_(planar)
        return self

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, axial_atoms={self.axial_atoms}x{self.axial.shape[1]}, "
                f"planar_atoms={self.planar_atoms}x{self.planar.shape[1]}x{self.planar.shape[2]}, axis={self.axis}"
                + (f", axial_dilation={self.axial_dilation}" if self.axial_dilation != 1 else ""))


JFD = JointFilterDecomposition


def _pad_rows(rows: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` rows; zero rows beyond what the mode has (an over-complete set
    of atoms gets atoms the kernel does not use)."""
    if rows.shape[0] >= count:
        return rows[:count]
    return torch.cat([rows, rows.new_zeros(count - rows.shape[0], rows.shape[1])])


def _crop(x: torch.Tensor, crops: Sequence[int]) -> torch.Tensor:
    for axis, c in enumerate(crops):
        if c:
            x = x.narrow(2 + axis, c, x.shape[2 + axis] - 2 * c)
    return x
