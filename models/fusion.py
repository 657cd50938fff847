"""Inference-time fusion of convolution (+ batch norm) + ReLU into one oneDNN kernel.

On a CPU most of a PmSCn network's time is not the multiply-accumulates but passes over
memory: a PmSCn stream's thin 2D and 1D convolutions each write their output, and a
separate ReLU reads and writes it again. oneDNN can apply the ReLU while it writes the
convolution's output (a "post-op"); torch exposes that as
``torch.ops.mkldnn._convolution_pointwise``, the kernel ``torch.compile`` uses on CPU.
:func:`fuse_for_inference` rewrites an eval-mode copy of a network so that every

* ``Conv3d`` followed by ``ReLU``,
* ``Conv3d`` followed by ``BatchNorm3d`` and ``ReLU`` (the batch norm folded into the
  convolution's weights with torch's ``fuse_conv_bn_eval``), and
* ``PmSCn`` block followed by ``ReLU`` (the ReLU moved into each stream's last
  convolution: ReLU of a concatenation is the concatenation of the ReLUs)

inside an ``nn.Sequential`` becomes one :class:`ConvReLU3d`. Positions are kept (the
layers folded away become ``nn.Identity``), so code that indexes a Sequential still
works. The result computes the same function; off the CPU, with gradients, or in a
torch without the kernel, :class:`ConvReLU3d` runs the convolution and the ReLU as two
ordinary ops.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .pmscn import PmSCn

_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() else None


class ConvReLU3d(nn.Module):
    """``relu(conv(x))``, in one oneDNN kernel on CPU at inference."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        self.conv = conv

    def _fusable(self, x: torch.Tensor) -> bool:
        conv = self.conv
        return (_POINTWISE is not None and x.device.type == "cpu" and not torch.is_grad_enabled()
                and not isinstance(conv.padding, str) and conv.padding_mode == "zeros"
                and x.dtype in (torch.float32, torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable(x):
            return F.relu(self.conv(x))
        # Under autocast the kernel must be handed what autocast would have used.
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if dtype not in (torch.float32, torch.bfloat16):
            return F.relu(self.conv(x))
        conv = self.conv
        bias = None if conv.bias is None else conv.bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _POINTWISE(x.to(dtype), conv.weight.to(dtype), bias, list(conv.padding), list(conv.stride),
                              list(conv.dilation), conv.groups, "relu", [], "")


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with convolution (+ batch norm) + ReLU fused (see
    the module doc). ``model`` itself is not changed."""
    fused = copy.deepcopy(model).eval()
    for module in list(fused.modules()):
        if isinstance(module, nn.Sequential):
            _fuse_sequential(module)
    return fused


def _fuse_sequential(sequence: nn.Sequential) -> None:
    names = list(sequence._modules)
    i = 0
    while i < len(names):
        layer, end = sequence[i], i + 1
        if isinstance(layer, nn.Conv3d) and not isinstance(layer, nn.ConvTranspose3d):
            if end < len(names) and isinstance(sequence[end], nn.BatchNorm3d):
                layer, end = fuse_conv_bn_eval(layer, sequence[end]), end + 1
            if end < len(names) and isinstance(sequence[end], nn.ReLU):
                _replace(sequence, names, i, end, ConvReLU3d(layer))
                i = end + 1
                continue
        elif isinstance(layer, PmSCn) and end < len(names) and isinstance(sequence[end], nn.ReLU):
            for stream in layer.streams:
                if not isinstance(stream.line, ConvReLU3d):
                    stream.line = ConvReLU3d(stream.line)
            sequence._modules[names[end]] = nn.Identity()
            i = end + 1
            continue
        i += 1


def _replace(sequence: nn.Sequential, names: list[str], first: int, last: int, fused: nn.Module) -> None:
    sequence._modules[names[first]] = fused
    for k in range(first + 1, last + 1):
        sequence._modules[names[k]] = nn.Identity()
