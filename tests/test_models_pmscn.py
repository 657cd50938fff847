"""The PmSCn block against explicit convolutions and its documented width rule."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psc.models import PmSCn, make_conv
from psc.models.pmscn import SeparableStream

torch.manual_seed(0)


def test_rank_one_separable_kernel_equals_its_2d_then_1d_chain():
    """w[o,i,z,y,x] = sum_r line[o,r,z] * plane[r,i,y,x] is one 2D conv then one 1D conv."""
    plane = torch.randn(5, 3, 1, 3, 3, dtype=torch.float64)
    line = torch.randn(4, 5, 3, 1, 1, dtype=torch.float64)
    full = torch.einsum("orz,riyx->oizyx", line[:, :, :, 0, 0], plane[:, :, 0])
    x = torch.randn(2, 3, 9, 10, 11, dtype=torch.float64)
    reference = F.conv3d(x, full, padding=1)
    chain = F.conv3d(F.conv3d(x, plane, padding=(0, 1, 1)), line, padding=(1, 0, 0))
    torch.testing.assert_close(chain, reference)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_each_stream_orientation_computes_the_separable_3d_kernel(axis):
    """A SeparableStream (n=1) with non-negative 2D weights on a non-negative input (so
    its ReLU is the identity) equals the 3D kernel its two factors make."""
    stream = SeparableStream(2, 3, 4, axis=axis, n=1, kernel_size=3, stride=(1, 1, 1), padding=1, bias=False)
    stream = stream.double()
    with torch.no_grad():
        stream.planar[0].weight.abs_()
    planar = stream.planar[0].weight.squeeze(2 + axis)  # (3, 2, a, b)
    line = stream.line.weight.flatten(2)  # (4, 3, k)
    full = torch.einsum("orl,riab->oilab", line, planar)  # 1D axis first
    full = full.movedim(2, 2 + axis)
    x = torch.rand(1, 2, 7, 8, 9, dtype=torch.float64)
    torch.testing.assert_close(stream(x), F.conv3d(x, full, padding=1))


def test_relu_sits_between_the_2d_and_the_1d_convolution():
    block = PmSCn(1, 1, m=1, n=1, mid_channels=1, bias=False).double()
    with torch.no_grad():
        block.streams[0].planar[0].weight.fill_(-1.0)  # planar output is negative -> ReLU -> 0
        block.streams[0].line.weight.fill_(1.0)
    assert torch.count_nonzero(block(torch.rand(1, 1, 5, 5, 5, dtype=torch.float64))) == 0


@pytest.mark.parametrize("m,n", list(itertools.product([1, 2, 3], [1, 2, 3])))
@pytest.mark.parametrize("shape", [(7, 9, 11), (5, 13, 6)])
@pytest.mark.parametrize("stride", [1, 2, (1, 2, 2)])
def test_output_shape_equals_conv3d(m, n, shape, stride):
    x = torch.randn(1, 4, *shape)
    expected = nn.Conv3d(4, 6, 3, stride=stride, padding=1)(x).shape
    assert PmSCn(4, 6, m=m, n=n, stride=stride)(x).shape == expected


@pytest.mark.parametrize("m,n", list(itertools.product([1, 2, 3], [1, 2, 3])))
def test_valid_padding_equals_n_chained_valid_conv3d(m, n):
    x = torch.randn(1, 3, 15, 14, 16)
    y = x
    for _ in range(n):
        y = nn.Conv3d(y.shape[1], 5, 3)(y)
    assert PmSCn(3, 5, m=m, n=n, padding=0)(x).shape == y.shape


def documented_parameter_count(cin, cout, m, n, k=3, mid=None, bias=True):
    """The width rule of models/pmscn.py, written out independently."""
    total = mid if mid is not None else max(m, round(cin * cout * k**3 / (cin * k * k + cout * k)))

    def split(t):
        return [t // m + t % m] + [t // m] * (m - 1)

    count = 0
    for ms, os_ in zip(split(total), split(cout)):
        count += cin * ms * k * k + (n - 1) * ms * ms * k * k + ms * os_ * k
        if bias:
            count += n * ms + os_
    return count


@pytest.mark.parametrize("cin,cout,m,n,mid", [(1, 4, 1, 1, None), (16, 16, 2, 2, None), (24, 12, 2, 3, None),
                                              (32, 64, 3, 1, None), (7, 9, 3, 2, None), (8, 8, 2, 2, 10)])
def test_parameter_count_follows_the_documented_width_rule(cin, cout, m, n, mid):
    block = PmSCn(cin, cout, m=m, n=n, mid_channels=mid)
    assert sum(p.numel() for p in block.parameters()) == documented_parameter_count(cin, cout, m, n, mid=mid)
    outs = [s.line.out_channels for s in block.streams]
    assert sum(outs) == cout and outs[0] - outs[-1] == cout % m


def test_p1sc1_has_about_the_conv3d_parameter_count():
    """Eq. 5 is chosen so that one 2D+1D pair costs what the 3x3x3 conv costs."""
    conv = 32 * 32 * 27
    block = PmSCn(32, 32, m=1, n=1, bias=False)
    assert abs(sum(p.numel() for p in block.parameters()) - conv) / conv < 0.01


def test_gradients_reach_every_parameter():
    block = PmSCn(3, 8, m=3, n=2, stride=2)
    block(torch.randn(2, 3, 9, 9, 9)).square().mean().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


@pytest.mark.parametrize("name,kind", [("conv3d", nn.Conv3d), ("p1sc1", PmSCn), ("p2sc2", PmSCn), ("p3sc4", PmSCn)])
def test_make_conv_builds_with_conv3d_signature(name, kind):
    builder = make_conv(name)
    module = builder(4, 8, 3, stride=2, padding=1, bias=False)
    assert isinstance(module, kind)
    assert module(torch.randn(1, 4, 8, 8, 8)).shape == (1, 8, 4, 4, 4)
    assert builder.convs_per_block == (1 if name == "conv3d" else int(name[-1]))


@pytest.mark.parametrize("name", ["p4sc1", "p0sc1", "psc", "p2sc0", "conv2d", ""])
def test_make_conv_rejects_unknown_names(name):
    with pytest.raises(ValueError):
        make_conv(name)
