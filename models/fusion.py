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
* ``PmSCn`` block followed by ``ReLU``, or by ``BatchNorm3d`` and ``ReLU`` (the batch
  norm split by channel over the streams and folded into each stream's last
  convolution, the ReLU moved there too: batch norm and ReLU of a concatenation are the
  concatenation of the per-stream ones),
* ``Cakes`` layer followed by ``ReLU``, or by ``BatchNorm3d`` and ``ReLU`` (the same per
  group: each kernel-shape group is one convolution whose output channels are known, so
  its part of the batch norm is folded into it, the ReLU its post-op), and
* ``JointFilterDecomposition`` followed by ``ReLU``, or by ``BatchNorm3d`` and ``ReLU``
  (folded into the 1x1x1 joint-coefficient convolution, the layer's last: the two atom
  convolutions before it are linear and shared by all output channels, so nothing of a
  per-channel batch norm can go into them)

inside an ``nn.Sequential`` becomes one :class:`ConvReLU3d`, and every

* ``BatchNorm3d`` followed by ``ReLU`` with no convolution before it (the pre-activation
  of DenseNet layers, transitions and side outputs, whose input is a concatenation)

becomes a :class:`BatchNormReLU3d`: the batch norm as a per-channel (depthwise) 1x1x1
convolution with the ReLU as its post-op, one pass over memory instead of two (in bf16,
over 32 brain-sized channels, a batch norm plus an in-place ReLU took 111 ms, the
depthwise kernel 49 ms).

Not fused: the ``CakesSearch`` layer (a training-time module; freeze it first,
``models/cakes.freeze_search``) and a batch norm with no ReLU after it (a ResNet block's
second normalisation, before the residual addition), as for the other convolutions.

Positions are kept (the layers folded away become ``nn.Identity``), so code that
indexes a Sequential still works. The result computes the same function; off the CPU,
with gradients, in a torch without the kernel, or under ``torch.compile`` (whose
inductor makes the same fusions, and cannot trace this kernel's strides), both modules
run the ordinary ops instead.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .cakes import Cakes
from .jfd import JointFilterDecomposition
from .pmscn import PmSCn

_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None) if torch.backends.mkldnn.is_available() else None


# oneDNN's bf16 convolutions need AVX512 (BW/VL/DQ) or AVX-NE-CONVERT; on other CPUs
# (e.g. an AVX2-only AMD EPYC) the kernel refuses bf16 inputs, so there the fused
# modules run bf16 through the ordinary ops, which emulate it.
_KERNEL_DTYPES = (torch.float32,) + (
    (torch.bfloat16,) if bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()) else ())


def _onednn_applies(x: torch.Tensor) -> bool:
    """Whether the oneDNN kernel may run on ``x`` (the conditions both modules share)."""
    return (_POINTWISE is not None and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # inductor fuses on its own
            and x.dtype in _KERNEL_DTYPES)


class ConvReLU3d(nn.Module):
    """``relu(conv(x))``, in one oneDNN kernel on CPU at inference."""

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        self.conv = conv

    def _fusable(self, x: torch.Tensor) -> bool:
        conv = self.conv
        return _onednn_applies(x) and not isinstance(conv.padding, str) and conv.padding_mode == "zeros"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable(x):
            return F.relu(self.conv(x))
        # Under autocast the kernel must be handed what autocast would have used.
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        if dtype not in _KERNEL_DTYPES:
            return F.relu(self.conv(x))
        conv = self.conv
        bias = None if conv.bias is None else conv.bias.to(dtype)
        with torch.autocast("cpu", enabled=False):
            return _POINTWISE(x.to(dtype), conv.weight.to(dtype), bias, list(conv.padding), list(conv.stride),
                              list(conv.dilation), conv.groups, "relu", [], "")


class BatchNormReLU3d(nn.Module):
    """``relu(batch_norm(x))`` at inference, as one oneDNN depthwise 1x1x1 convolution
    with a ReLU post-op on CPU; elsewhere (CUDA, gradients, other dtypes) the batch norm
    and the ReLU themselves."""

    def __init__(self, norm: nn.BatchNorm3d) -> None:
        super().__init__()
        self.norm = norm
        scale = norm.running_var.add(norm.eps).rsqrt()
        if norm.affine:
            scale = scale * norm.weight.detach()
        shift = -norm.running_mean * scale
        if norm.affine:
            shift = shift + norm.bias.detach()
        channels = norm.num_features
        self.register_buffer("scale", scale.reshape(channels, 1, 1, 1, 1).contiguous(), persistent=False)
        self.register_buffer("shift", shift.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _onednn_applies(x) or x.dim() != 5:
            return F.relu(self.norm(x))
        # Batch norm keeps x's dtype under autocast (it is not a lower-precision op), so
        # the depthwise kernel runs in x's dtype too, whatever the autocast dtype.
        dtype = x.dtype
        with torch.autocast("cpu", enabled=False):
            return _POINTWISE(x, self.scale.to(dtype), self.shift.to(dtype), [0, 0, 0], [1, 1, 1], [1, 1, 1],
                              self.norm.num_features, "relu", [], "")


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
        elif isinstance(layer, PmSCn) and not any(isinstance(s.line, ConvReLU3d) for s in layer.streams):
            norm = sequence[end] if end < len(names) and isinstance(sequence[end], nn.BatchNorm3d) else None
            relu = end + (norm is not None)
            if relu < len(names) and isinstance(sequence[relu], nn.ReLU):
                first = 0
                for stream in layer.streams:
                    line = stream.line
                    if norm is not None:
                        line = fuse_conv_bn_eval(line, _channels(norm, first, line.out_channels))
                        first += line.out_channels
                    stream.line = ConvReLU3d(line)
                _replace(sequence, names, i, relu, layer)
                i = relu + 1
                continue
        elif isinstance(layer, Cakes) and not any(isinstance(g, ConvReLU3d) for g in layer.groups):
            norm = sequence[end] if end < len(names) and isinstance(sequence[end], nn.BatchNorm3d) else None
            relu = end + (norm is not None)
            if relu < len(names) and isinstance(sequence[relu], nn.ReLU):
                for k, channels in enumerate(layer.group_channels()):
                    group = layer.groups[k]
                    if norm is not None:
                        group = fuse_conv_bn_eval(group, _select_channels(norm, channels))
                    layer.groups[k] = ConvReLU3d(group)
                _replace(sequence, names, i, relu, layer)
                i = relu + 1
                continue
        elif isinstance(layer, JointFilterDecomposition) and not isinstance(layer.coefficients, ConvReLU3d):
            norm = sequence[end] if end < len(names) and isinstance(sequence[end], nn.BatchNorm3d) else None
            relu = end + (norm is not None)
            if relu < len(names) and isinstance(sequence[relu], nn.ReLU):
                last = layer.coefficients
                if norm is not None:
                    last = fuse_conv_bn_eval(last, norm)
                layer.coefficients = ConvReLU3d(last)
                _replace(sequence, names, i, relu, layer)
                i = relu + 1
                continue
        elif (isinstance(layer, nn.BatchNorm3d) and layer.track_running_stats and end < len(names)
              and isinstance(sequence[end], nn.ReLU)):
            _replace(sequence, names, i, end, BatchNormReLU3d(layer))
            i = end + 1
            continue
        i += 1


def _channels(norm: nn.BatchNorm3d, first: int, count: int) -> nn.BatchNorm3d:
    """The batch norm of channels ``first .. first + count`` of ``norm``'s input."""
    return _select_channels(norm, torch.arange(first, first + count))


def _select_channels(norm: nn.BatchNorm3d, channels: torch.Tensor) -> nn.BatchNorm3d:
    """The batch norm of the given channels of ``norm``'s input, in that order."""
    index = channels.to(norm.running_mean.device)
    part = nn.BatchNorm3d(len(index), eps=norm.eps, affine=norm.affine).eval()
    part.to(device=norm.running_mean.device, dtype=norm.running_mean.dtype)
    part.running_mean.copy_(norm.running_mean[index])
    part.running_var.copy_(norm.running_var[index])
    if norm.affine:
        part.weight.data.copy_(norm.weight.detach()[index])
        part.bias.data.copy_(norm.bias.detach()[index])
    return part


def _replace(sequence: nn.Sequential, names: list[str], first: int, last: int, fused: nn.Module) -> None:
    sequence._modules[names[first]] = fused
    for k in range(first + 1, last + 1):
        sequence._modules[names[k]] = nn.Identity()
