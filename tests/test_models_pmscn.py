"""The PmSCn block against explicit convolutions and its documented width rule."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psc.models import PmSCn, make_conv
from psc.models.pmscn import SeparableStream

MN = list(itertools.product([1, 2, 3], [1, 2, 3]))


def line_shape(axis: int, d: int = 3) -> tuple[int, int, int]:
    return tuple(d if a == axis else 1 for a in range(3))


def plane_shape(axis: int, d: int = 3) -> tuple[int, int, int]:
    return tuple(1 if a == axis else d for a in range(3))


def separable_kernel(line: torch.Tensor, plane: torch.Tensor, axis: int) -> torch.Tensor:
    """Full 3D kernel of a 2D conv ``plane`` (R, in, plane_shape) followed by a 1D conv
    ``line`` (out, R, line_shape): w[o, i, ...] = sum_r line[o, r, l] * plane[r, i, a, b],
    with the 1D index l placed on ``axis``."""
    full = torch.einsum("orl,riab->oilab", line.flatten(2), plane.squeeze(2 + axis))
    return full.movedim(2, 2 + axis)


# --- separable kernels == 2D-then-1D chains ---------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("stride", [1, 2, (1, 2, 2)])
def test_rank_one_kernel_equals_plane_then_line_conv(axis, stride):
    """w[o,i,z,y,x] = a[o,i,y,x] * b[z] (for axis 0): a 2D conv (in -> out) with ``a``, then
    a per-channel 1D conv with ``b`` gives what F.conv3d with ``w`` gives; stride is taken
    once per axis (in-plane by the 2D conv, along ``axis`` by the 1D conv)."""
    torch.manual_seed(axis)
    cin, cout = 3, 4
    a = torch.randn(cout, cin, *plane_shape(axis), dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    w = a * b.view(line_shape(axis))  # broadcast: (out, in, 3, 3, 3)
    eye = torch.eye(cout, dtype=torch.float64)
    line = torch.einsum("or,l->orl", eye, b).reshape(cout, cout, *line_shape(axis))  # per-channel 1D conv
    s = (stride,) * 3 if isinstance(stride, int) else stride
    plane_stride = tuple(1 if i == axis else s[i] for i in range(3))
    line_stride = tuple(s[i] if i == axis else 1 for i in range(3))
    x = torch.randn(2, cin, 9, 10, 11, dtype=torch.float64)
    reference = F.conv3d(x, w, stride=stride, padding=1)
    mid = F.conv3d(x, a, stride=plane_stride, padding=tuple(0 if i == axis else 1 for i in range(3)))
    chain = F.conv3d(mid, line, stride=line_stride, padding=tuple(1 if i == axis else 0 for i in range(3)))
    torch.testing.assert_close(chain, reference)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_rank_r_separable_kernel_equals_its_chain(axis):
    """The out x in generalisation: sum over R sub-space filters."""
    torch.manual_seed(10 + axis)
    plane = torch.randn(5, 3, *plane_shape(axis), dtype=torch.float64)
    line = torch.randn(4, 5, *line_shape(axis), dtype=torch.float64)
    x = torch.randn(2, 3, 9, 10, 11, dtype=torch.float64)
    reference = F.conv3d(x, separable_kernel(line, plane, axis), padding=1)
    chain = F.conv3d(F.conv3d(x, plane, padding=tuple(0 if i == axis else 1 for i in range(3))), line,
                     padding=tuple(1 if i == axis else 0 for i in range(3)))
    torch.testing.assert_close(chain, reference)


def test_p1sc1_block_is_the_separable_conv3d_it_is_set_to():
    """PmSCn(m=1, n=1, mid_channels=R) with non-negative 2D weights on a non-negative input
    (ReLU is then the identity) and zero 2D bias equals F.conv3d with the full kernel plus
    the 1D conv's bias."""
    torch.manual_seed(1)
    block = PmSCn(3, 4, m=1, n=1, mid_channels=5).double()
    stream = block.streams[0]
    assert stream.axis == 0
    assert stream.planar[0].weight.shape == (5, 3, 1, 3, 3) and stream.line.weight.shape == (4, 5, 3, 1, 1)
    with torch.no_grad():
        stream.planar[0].weight.uniform_(0, 1)
        stream.planar[0].bias.zero_()
    full = separable_kernel(stream.line.weight, stream.planar[0].weight, 0)
    x = torch.rand(2, 3, 7, 8, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.conv3d(x, full, stream.line.bias, padding=1))


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), ((1, 2, 2), 1), (1, 0)])
def test_p3sc1_block_is_the_concatenation_of_three_oriented_separable_kernels(stride, padding):
    """m=3: stream s has its 1D conv along axis s; with ReLU the identity the block is one
    Conv3d whose output channels are the three streams' separable kernels, in order, with
    the output channels split 3/2/2."""
    torch.manual_seed(2)
    block = PmSCn(2, 7, m=3, n=1, mid_channels=7, stride=stride, padding=padding, bias=False).double()
    kernels = []
    for axis, (stream, mid, out) in enumerate(zip(block.streams, (3, 2, 2), (3, 2, 2))):
        assert stream.axis == axis
        assert stream.planar[0].weight.shape == (mid, 2, *plane_shape(axis))
        assert stream.line.weight.shape == (out, mid, *line_shape(axis))
        with torch.no_grad():
            stream.planar[0].weight.uniform_(0, 1)
        kernels.append(separable_kernel(stream.line.weight, stream.planar[0].weight, axis))
    full = torch.cat(kernels, dim=0)
    x = torch.rand(1, 2, 9, 8, 11, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), F.conv3d(x, full, stride=stride, padding=padding))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_stream_class_matches_its_separable_kernel(axis):
    stream = SeparableStream(2, 3, 4, axis=axis, n=1, kernel_size=3, stride=(1, 1, 1), padding=1,
                             bias=False).double()
    with torch.no_grad():
        stream.planar[0].weight.abs_()
    full = separable_kernel(stream.line.weight, stream.planar[0].weight, axis)
    x = torch.rand(1, 2, 7, 8, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(stream(x), F.conv3d(x, full, padding=1))


def test_relu_sits_between_the_2d_and_the_1d_convolution():
    block = PmSCn(1, 1, m=1, n=1, mid_channels=1, bias=False).double()
    with torch.no_grad():
        block.streams[0].planar[0].weight.fill_(-1.0)  # planar output is negative -> ReLU -> 0
        block.streams[0].line.weight.fill_(1.0)
    assert torch.count_nonzero(block(torch.rand(1, 1, 5, 5, 5, dtype=torch.float64))) == 0


@pytest.mark.parametrize("m,n", MN)
@pytest.mark.parametrize("stride", [1, 2])
def test_block_computes_the_documented_chain_with_relus(m, n, stride):
    """Signed weights, so the ReLUs matter: every stream is n (2D conv, ReLU) then the 1D
    conv, stride once per axis; streams concatenated on channels."""
    torch.manual_seed(m * 10 + n)
    block = PmSCn(3, 5, m=m, n=n, stride=stride).double()
    x = torch.randn(1, 3, 8, 9, 7, dtype=torch.float64)
    outputs = []
    for axis, stream in enumerate(block.streams):
        convs = [layer for layer in stream.planar if isinstance(layer, nn.Conv3d)]
        assert len(convs) == n and all(tuple(c.kernel_size) == plane_shape(axis) for c in convs)
        y = x
        for i, conv in enumerate(convs):
            s = tuple(1 if a == axis or i > 0 else stride for a in range(3))
            y = F.relu(F.conv3d(y, conv.weight, conv.bias, stride=s,
                                padding=tuple(0 if a == axis else 1 for a in range(3))))
        y = F.conv3d(y, stream.line.weight, stream.line.bias,
                     stride=tuple(stride if a == axis else 1 for a in range(3)),
                     padding=tuple(1 if a == axis else 0 for a in range(3)))
        outputs.append(y)
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.cat(outputs, dim=1))


@pytest.mark.parametrize("m,n", MN)
def test_valid_output_is_the_interior_of_the_same_output(m, n):
    """Valid padding is centred like n chained valid Conv3d's: with the same weights, the
    valid output equals the 'same' output without its n outer voxels on every axis (those
    are the only ones that see zero padding), ReLUs included."""
    torch.manual_seed(m + 7 * n)
    same = PmSCn(2, 4, m=m, n=n, padding=1).double()
    valid = PmSCn(2, 4, m=m, n=n, padding=0).double()
    valid.load_state_dict(same.state_dict())
    x = torch.randn(1, 2, 11, 12, 13, dtype=torch.float64)
    with torch.no_grad():
        expected = same(x)[:, :, n:-n, n:-n, n:-n]
        torch.testing.assert_close(valid(x), expected)


# --- shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize("m,n", MN)
@pytest.mark.parametrize("shape", [(7, 9, 11), (5, 13, 6)])
@pytest.mark.parametrize("stride", [1, 2, (1, 2, 2)])
def test_output_shape_equals_conv3d(m, n, shape, stride):
    x = torch.randn(1, 4, *shape)
    expected = nn.Conv3d(4, 6, 3, stride=stride, padding=1)(x).shape
    assert PmSCn(4, 6, m=m, n=n, stride=stride)(x).shape == expected


@pytest.mark.parametrize("m,n", MN)
@pytest.mark.parametrize("shape", [(15, 14, 16), (17, 13, 19)])
@pytest.mark.parametrize("stride", [1, 2])
def test_valid_padding_shape_equals_n_chained_valid_conv3d(m, n, shape, stride):
    x = torch.randn(1, 3, *shape)
    y = x
    for i in range(n):
        y = nn.Conv3d(y.shape[1], 5, 3, stride=stride if i == 0 else 1)(y)
    assert PmSCn(3, 5, m=m, n=n, padding=0, stride=stride)(x).shape == y.shape
    assert PmSCn(3, 5, m=m, n=n, padding="valid", stride=stride)(x).shape == y.shape


# --- the width rule ---------------------------------------------------------------------


def split(total: int, parts: int) -> list[int]:
    return [total // parts + total % parts] + [total // parts] * (parts - 1)


def documented_width(cin: int, cout: int, m: int, k: int = 3) -> int:
    """M = round(in*out*k^3 / (in*k^2 + out*k)), at least m (module docstring)."""
    return max(m, round(cin * cout * k**3 / (cin * k * k + cout * k)))


def documented_parameter_count(cin, cout, m, n, k=3, mid=None, bias=True):
    """The width rule of models/pmscn.py, written out independently."""
    total = mid if mid is not None else documented_width(cin, cout, m, k)
    count = 0
    for ms, os_ in zip(split(total, m), split(cout, m)):
        count += cin * ms * k * k + (n - 1) * ms * ms * k * k + ms * os_ * k
        if bias:
            count += n * ms + os_
    return count


CASES = [(1, 4, 1, 1, None), (16, 16, 2, 2, None), (24, 12, 2, 3, None), (32, 64, 3, 1, None),
         (7, 9, 3, 2, None), (5, 11, 3, 3, None), (8, 8, 2, 2, 10), (3, 8, 3, 2, 4), (64, 32, 1, 4, None)]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cin,cout,m,n,mid", CASES)
def test_parameter_count_follows_the_documented_width_rule(cin, cout, m, n, mid, bias):
    block = PmSCn(cin, cout, m=m, n=n, mid_channels=mid, bias=bias)
    assert sum(p.numel() for p in block.parameters()) == documented_parameter_count(cin, cout, m, n, mid=mid,
                                                                                   bias=bias)
    total = mid if mid is not None else documented_width(cin, cout, m)
    assert block.mid_channels == total
    # Sub-space widths and output channels: split evenly, remainder to the first stream.
    assert [s.line.in_channels for s in block.streams] == split(total, m)
    assert [s.planar[0].out_channels for s in block.streams] == split(total, m)
    assert [s.line.out_channels for s in block.streams] == split(cout, m)
    assert all(s.planar[0].in_channels == cin for s in block.streams)


def test_width_rule_values():
    """Eq. 5 evaluated by hand for a few blocks."""
    assert PmSCn(32, 32, m=1, n=1).mid_channels == 72  # 32*32*27 / (32*9 + 32*3) = 72 exactly
    assert PmSCn(1, 4, m=1, n=1).mid_channels == 5  # 108 / 21 = 5.14
    assert PmSCn(16, 8, m=3, n=1).mid_channels == 21  # 3456 / 168 = 20.57
    assert PmSCn(16, 8, m=3, n=2, mid_channels=6).mid_channels == 6


def test_p1sc1_has_about_the_conv3d_parameter_count():
    """Eq. 5 is chosen so that one 2D+1D pair costs what the 3x3x3 conv costs."""
    conv = 32 * 32 * 27
    block = PmSCn(32, 32, m=1, n=1, bias=False)
    assert abs(sum(p.numel() for p in block.parameters()) - conv) / conv < 0.01


# --- gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("m,n", MN)
@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 1), (1, 0)])
def test_gradients_reach_every_parameter(m, n, stride, padding):
    torch.manual_seed(3)
    block = PmSCn(3, 8, m=m, n=n, stride=stride, padding=padding)
    block(torch.randn(2, 3, 11, 11, 11)).square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


# --- the registry -----------------------------------------------------------------------


@pytest.mark.parametrize("name,kind,n", [("conv3d", nn.Conv3d, 1), ("p1sc1", PmSCn, 1), ("p2sc2", PmSCn, 2),
                                         ("p3sc4", PmSCn, 4)])
def test_make_conv_builds_with_conv3d_signature(name, kind, n):
    builder = make_conv(name)
    assert builder.convs_per_block == n
    module = builder(4, 8, 3, stride=2, padding=1, bias=False)  # Conv3d's positional/keyword order
    assert type(module) is kind
    assert all(not (isinstance(c, nn.Conv3d) and c.bias is not None) for c in module.modules())
    x = torch.randn(1, 4, 9, 8, 7)
    assert module(x).shape == nn.Conv3d(4, 8, 3, stride=2, padding=1)(x).shape
    # Conv3d's default padding is 0 (valid), and so is the builder's.
    if n == 1:
        assert builder(4, 8, 3)(x).shape == nn.Conv3d(4, 8, 3)(x).shape
    if kind is PmSCn:
        assert (module.m, module.n) == (int(name[1]), n)
        assert builder(4, 8, 3).padding == 0 and builder(4, 8, 3, padding=1).padding == 1
    else:
        assert module.stride == (2, 2, 2) and module.padding == (1, 1, 1)


@pytest.mark.parametrize("name", ["p4sc1", "p0sc1", "psc", "p2sc0", "conv2d", "", "p2sc"])
def test_make_conv_rejects_unknown_names(name):
    with pytest.raises(ValueError):
        make_conv(name)


def test_pmscn_rejects_what_it_cannot_build():
    for kwargs in ({"m": 4}, {"m": 0}, {"n": 0}, {"kernel_size": 4}, {"padding": 2}):
        with pytest.raises(ValueError):
            PmSCn(4, 8, **kwargs)
    with pytest.raises(ValueError):
        PmSCn(4, 2, m=3)  # fewer output channels than streams
    with pytest.raises(ValueError):
        make_conv("p2sc2")(4, 8, 3, dilation=2)
