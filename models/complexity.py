"""Measured (not estimated) size, cost and reach of a model.

* parameters: counted;
* multiply-accumulates per output voxel: torch's own ``FlopCounterMode`` over one
  forward pass, divided by two and by the number of output voxels;
* receptive field: measured by back-propagation through a copy of the model whose
  weights are all positive and whose normalisation layers are identities, so no
  ReLU can hide a path: the input voxels with non-zero gradient for one central
  output voxel span the receptive field, per axis. "Weights" are all parameters with
  more than one dimension, whatever their name (the atoms of ``models/jfd.py`` and the
  search logits of ``models/cakes.py`` too), so a layer that builds its kernels from
  other parameters is probed through the kernels it really uses.

These hold for every convolution of the registry (conv3d, PmSCn, CAKES, joint filter
decomposition): each is made of torch convolutions that ``FlopCounterMode`` counts
(grouped ones included), and none has a kernel footprint that the probe cannot see.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass
class Complexity:
    parameters: int
    macs_per_voxel: float
    receptive_field: tuple[int, int, int] | None


def _device_of(model: nn.Module) -> torch.device:
    """Probe inputs go where the model lives (a CUDA model gets CUDA inputs)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs_per_output_voxel(model: nn.Module, input_shape: tuple[int, ...], in_channels: int) -> float:
    """Forward MACs divided by the output's spatial voxels (per sample). For a
    classifier (no spatial output) it is MACs per input voxel instead."""
    model = copy.deepcopy(model).eval()
    x = torch.zeros((1, in_channels, *input_shape), device=_device_of(model))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        y = model(x)
    voxels = y[0, 0].numel() if y.dim() == 5 else x[0, 0].numel()
    return counter.get_total_flops() / 2 / voxels


def _positive_copy(model: nn.Module) -> nn.Module:
    """Every parameter with more than one dimension (convolution kernels, and the atoms
    of a joint filter decomposition or the shape logits of a CAKES search, which are not
    called ``weight``) set to ``1 / fan_in``, every bias to zero, normalisation layers
    reset: every path through the network then carries a positive signal."""
    probe = copy.deepcopy(model).to(torch.float64).eval()
    for module in probe.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase):
            module.reset_parameters()
            module.reset_running_stats()
            continue
        for name, parameter in module.named_parameters(recurse=False):
            with torch.no_grad():
                if parameter.dim() > 1:
                    transposed = isinstance(module, nn.ConvTranspose3d) and name == "weight"
                    fan_in = parameter.shape[0] if transposed else parameter[0].numel()
                    parameter.fill_(1.0 / fan_in)
                elif name == "bias":
                    parameter.fill_(0.0)
    return probe


def _axis_span(probe: nn.Module, in_channels: int, axis: int, length: int, thin: int) -> tuple[int, bool]:
    """Span along ``axis`` of the input voxels reaching the central output voxel, in an
    input that is ``length`` long on that axis and ``thin`` on the others; and whether
    the span touches the input's ends (then the input was too short)."""
    shape = [thin, thin, thin]
    shape[axis] = length
    x = torch.ones((1, in_channels, *shape), dtype=torch.float64, device=_device_of(probe), requires_grad=True)
    y = probe(x)
    if y.dim() == 5:
        centre = tuple(s // 2 for s in y.shape[2:])
        y[(0, slice(None), *centre)].sum().backward()
    else:
        y.sum().backward()
    reach = x.grad[0].abs().sum(0) > 0
    hit = reach.any(dim=tuple(a for a in range(3) if a != axis)).nonzero().flatten()
    return int(hit.max() - hit.min() + 1), bool(hit.min() == 0 or hit.max() == length - 1)


def receptive_field(model: nn.Module, in_channels: int, limit: int = 1024, thin: int = 8,
                    start: int = 32) -> tuple[int, int, int] | None:
    """Per-axis receptive field of the central output voxel, or ``None`` if an axis
    needs more than ``limit`` voxels. The field of these networks is a box, so each
    axis is probed with a long thin input (cheap even for fields of hundreds of
    voxels); ``thin`` must survive the model's downsampling. Weights are positive and
    the input is ones, so every ReLU passes and no path is hidden."""
    probe = _positive_copy(model)
    spans = []
    for axis in range(3):
        length = start
        while True:
            span, touches = _axis_span(probe, in_channels, axis, length, thin)
            if not touches:
                spans.append(span)
                break
            if length >= limit:
                return None
            length = min(2 * length, limit)
    return tuple(spans)


def measure(model: nn.Module, in_channels: int, input_shape: tuple[int, int, int] = (32, 32, 32),
            with_receptive_field: bool = True, rf_limit: int = 1024, rf_model: nn.Module | None = None) -> Complexity:
    """``rf_model``: a narrow twin of ``model`` (same layout, fewer channels) to probe
    the receptive field on; the field depends on the layout only, and the probe is
    far cheaper on few channels."""
    rf = receptive_field(rf_model or model, in_channels, limit=rf_limit) if with_receptive_field else None
    return Complexity(count_parameters(model), macs_per_output_voxel(model, input_shape, in_channels), rf)
