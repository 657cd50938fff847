"""decompose_conv3d: section 3.1 of the paper against the Conv3d it decomposes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from psc.models import decompose_conv3d


def relative(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def check_close(actual, expected):
    """float32 rounding: absolute tolerance relative to the output's scale."""
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4)


CONVS = [  # in, out, stride, padding, bias
    (1, 1, 1, 1, True), (1, 4, 2, 0, True), (5, 1, 2, 1, False), (3, 5, 1, 1, False), (8, 4, 2, 1, True),
    (4, 6, 1, 0, True), (6, 6, (1, 2, 2), 1, False), (7, 3, 2, 0, False), (16, 16, 1, 1, True),
]


@pytest.mark.parametrize("cin,cout,stride,padding,bias", CONVS)
def test_full_rank_reproduces_the_conv3d(cin, cout, stride, padding, bias):
    torch.manual_seed(cin * 10 + cout)
    conv = nn.Conv3d(cin, cout, 3, stride=stride, padding=padding, bias=bias)
    module = decompose_conv3d(conv)
    x = torch.randn(2, cin, 9, 10, 11)
    with torch.no_grad():
        check_close(module(x), conv(x))
    assert module.relative_error < 1e-6
    assert relative(module.kernel().detach().double(), conv.weight.detach().double()) < 1e-6
    assert (module.bias is None) == (not bias)
    assert 1 <= len(module.streams) <= 3 and len({s.axis for s in module.streams}) == len(module.streams)


@pytest.mark.parametrize("cin,cout,stride,padding,bias", CONVS[:6])
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_forward_is_the_conv_with_the_reported_kernel_at_every_rank(cin, cout, stride, padding, bias, rank):
    """The module is linear: what it computes is F.conv3d with its own kernel()."""
    torch.manual_seed(rank)
    conv = nn.Conv3d(cin, cout, 3, stride=stride, padding=padding, bias=bias)
    module = decompose_conv3d(conv, rank=rank)
    assert module.rank == len(module.slices) <= rank
    if module.rank < rank:  # the core was covered by fewer slices: then it is exact
        assert module.relative_error < 1e-6
    x = torch.randn(1, cin, 8, 9, 10)
    with torch.no_grad():
        expected = F.conv3d(x, module.kernel(), module.bias, stride=stride, padding=padding)
        check_close(module(x), expected)


def test_error_falls_as_rank_rises_and_is_reported_truthfully():
    torch.manual_seed(1)
    conv = nn.Conv3d(6, 8, 3, padding=1)
    x = torch.randn(1, 6, 14, 14, 14)
    kernel = conv.weight.detach().double()
    no_bias = conv.bias.view(1, -1, 1, 1, 1)
    errors, output_errors = [], []
    for rank in range(1, 10):
        module = decompose_conv3d(conv, rank=rank)
        measured = relative(module.kernel().detach().double(), kernel)
        assert abs(measured - module.relative_error) < 1e-5
        errors.append(module.relative_error)
        with torch.no_grad():
            output_errors.append(relative(module(x) - no_bias, conv(x) - no_bias))
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:]))
    assert errors[0] > 0.3 and errors[-1] < 1e-6 and errors[-1] < errors[0]
    # On white-noise input the output error tracks the kernel error (the output is a
    # sum of many independent kernel-weighted inputs), up to borders and sampling.
    for kernel_error, output_error in zip(errors, output_errors):
        if kernel_error > 1e-3:
            assert 0.5 * kernel_error < output_error < 2 * kernel_error
    assert output_errors[0] > 0.3 and output_errors[-1] < 1e-5


def test_slices_cover_the_core_once_so_rank_nine_is_always_exact():
    """Any 3x3x3 core is covered by at most 9 slices (three along one axis suffice)."""
    for seed in range(3):
        torch.manual_seed(seed)
        conv = nn.Conv3d(2, 3, 3, padding=1, bias=False)
        full = decompose_conv3d(conv)
        assert full.rank <= 9 and full.relative_error < 1e-6
        assert decompose_conv3d(conv, rank=full.rank + 3).rank == full.rank  # no slice beyond full cover


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_separable_kernel_needs_rank_one(axis):
    """w = plane (out, in, in-plane) x line (along ``axis``): one slice, one stream, exact."""
    torch.manual_seed(axis)
    conv = nn.Conv3d(3, 4, 3, padding=1, bias=False)
    shape = [1, 1, 1, 1, 1]
    shape[2 + axis] = 3
    line = torch.randn(3).view(shape)
    plane = torch.randn(4, 3, 3, 3).unsqueeze(2 + axis)
    with torch.no_grad():
        conv.weight.copy_(line * plane)
    module = decompose_conv3d(conv, rank=1)
    assert module.relative_error < 1e-6 and len(module.streams) == 1 and module.streams[0].axis == axis
    assert module.slices[0][0] == "zyx"[axis]
    x = torch.randn(1, 3, 8, 9, 10)
    with torch.no_grad():
        check_close(module(x), conv(x))


def test_rejects_grouped_convolutions_and_bad_rank():
    with pytest.raises(ValueError):
        decompose_conv3d(nn.Conv3d(4, 4, 3, groups=2))
    with pytest.raises(ValueError):
        decompose_conv3d(nn.Conv3d(4, 4, 3, dilation=2))
    with pytest.raises(ValueError):  # its streams zero-pad: a reflect-padded conv would differ at the border
        decompose_conv3d(nn.Conv3d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError):
        decompose_conv3d(nn.Conv3d(4, 4, 3), rank=0)
