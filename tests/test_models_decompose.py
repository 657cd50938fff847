"""decompose_conv3d: section 3.1 of the paper against the Conv3d it decomposes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from psc.models import decompose_conv3d


def relative(a, b):
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


@pytest.mark.parametrize("cin,cout,stride,padding,bias", [(1, 1, 1, 1, True), (3, 5, 1, 1, False),
                                                          (8, 4, 2, 1, True), (4, 6, 1, 0, True),
                                                          (6, 6, (1, 2, 2), 1, False)])
def test_full_rank_reproduces_the_conv3d(cin, cout, stride, padding, bias):
    torch.manual_seed(cin * 10 + cout)
    conv = nn.Conv3d(cin, cout, 3, stride=stride, padding=padding, bias=bias)
    module = decompose_conv3d(conv)
    x = torch.randn(2, cin, 9, 10, 11)
    with torch.no_grad():
        expected, actual = conv(x), module(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5 * float(expected.abs().max()), rtol=1e-4)
    assert module.relative_error < 1e-6


def test_error_falls_as_rank_rises_and_is_reported_truthfully():
    torch.manual_seed(1)
    conv = nn.Conv3d(6, 8, 3, padding=1)
    x = torch.randn(1, 6, 12, 12, 12)
    kernel = conv.weight.detach().double()
    errors, output_errors = [], []
    for rank in range(1, 10):
        module = decompose_conv3d(conv, rank=rank)
        measured = relative(module.kernel().detach().double(), kernel)
        assert abs(measured - module.relative_error) < 1e-5
        errors.append(module.relative_error)
        with torch.no_grad():
            output_errors.append(relative(module(x) - conv.bias.view(1, -1, 1, 1, 1),
                                          conv(x) - conv.bias.view(1, -1, 1, 1, 1)))
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:]))
    assert errors[0] > 0.3 and errors[-1] < 1e-6
    assert output_errors[0] > output_errors[-1] and output_errors[-1] < 1e-5


def test_a_separable_kernel_needs_rank_one():
    conv = nn.Conv3d(3, 4, 3, padding=1, bias=False)
    with torch.no_grad():
        line = torch.randn(3)
        plane = torch.randn(4, 3, 3, 3)
        conv.weight.copy_(line.view(1, 1, 3, 1, 1) * plane.unsqueeze(2))
    module = decompose_conv3d(conv, rank=1)
    assert module.relative_error < 1e-6 and len(module.streams) == 1
    x = torch.randn(1, 3, 8, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(module(x), conv(x), atol=1e-5, rtol=1e-4)


def test_rejects_grouped_convolutions_and_bad_rank():
    with pytest.raises(ValueError):
        decompose_conv3d(nn.Conv3d(4, 4, 3, groups=2))
    with pytest.raises(ValueError):
        decompose_conv3d(nn.Conv3d(4, 4, 3), rank=0)
