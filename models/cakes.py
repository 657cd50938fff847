"""CAKES: channel-wise kernel shrinking (Yu, Li, Mei, Zhou & Yuille, AAAI 2021,
"CAKES: Channel-wise Automatic KErnel Shrinking for Efficient 3D Networks").

A 3x3x3 convolution computes every output channel with a full 3D kernel. CAKES shrinks
each output channel's kernel to a cheaper *sub-kernel* of it: one of the three 2D
kernels (1,3,3), (3,1,3), (3,3,1), one of the three 1D kernels (3,1,1), (1,3,1),
(1,1,3), or the full (3,3,3). Channels with the same shape form a group computed by one
``nn.Conv3d``; the groups' outputs are concatenated. Unlike PmSCn (a chain of 2D then
1D per stream), every output channel here is one convolution of the input, so the
layer's operations are heterogeneous within one layer and all read the same input.

Why psc wants it: it is the per-channel end of the design space whose per-stream end
is PmSCn, it needs no intermediate width (no Eq. 5 to read), and it can be set from a
trained Conv3d by keeping each channel's central slice (``load_conv3d``).

Configuration
-------------
A configuration maps kernel shapes to channel counts or fractions, e.g.
``{"1x3x3": 8, "3x1x3": 8, "3x3x1": 8, "3x3x3": 8}`` or ``{(1, 3, 3): 0.5, (3, 1, 1): 0.5}``.
Each entry of a shape is 1 or the kernel size on that axis. Integer values are channel
counts and must sum to ``out_channels``; any float makes all values fractions, turned
into counts by largest remainder (ties: the earlier shape in the canonical order). A
preset name may be given instead: ``"2d"`` (the default), ``"1d"``, ``"3d"``, ``"mix"``.

* ``"2d"`` (**the default**): an even split over the three 2D kernels. Why: every axis
  is seen by two of the three groups, the layer's receptive field is the 3x3x3 box (as
  the Conv3d's), all three planes are treated alike (volumetric data has no special
  axis), and it costs a third of the Conv3d's weights and multiply-accumulates.
* ``"1d"``: an even split over the three 1D kernels (a ninth of the weights).
* ``"3d"``: every channel on the 3x3x3 kernel: exactly an ``nn.Conv3d``.
* ``"mix"``: an even split over all seven shapes.

Even splits give the remainder to the first shapes. Groups are concatenated in the
canonical order 3x3x3, 1x3x3, 3x1x3, 3x3x1, 3x1x1, 1x3x1, 1x1x3 (only the non-empty
ones), unless ``channel_order`` says otherwise (used to freeze a search in place).

Parameter rule
--------------
With ``c_g`` output channels on shape ``s_g`` (``|s_g|`` its number of taps)::

    parameters = in_channels * sum_g c_g * |s_g|  +  out_channels (bias)

and, with stride 1 and "same" padding, the same sum (without the bias) is the
multiply-accumulates per output voxel. For 3x3x3 kernels: 27 taps (3D), 9 (2D), 3 (1D).

Padding and stride
------------------
``padding`` is Conv3d's: an int or three (0 = valid, ``k // 2`` = same), or "same" /
"valid". Every group must give the Conv3d's output size: on an axis where a group's
kernel is 1 instead of ``k``, its padding is ``p - (k - 1) / 2``; where that is
negative (valid padding), the group's input is centre-cropped by that much instead,
which is exactly the central slice of the Conv3d's window. Stride is the Conv3d's on
every axis, so output sizes equal a Conv3d's for any input size, odd ones included.

The search
----------
:class:`CakesSearch` is the differentiable version: one shared 3x3x3 *super-kernel*
per layer (every sub-kernel is a centred slice of it, so one convolution computes the
layer whatever each channel picks: the search costs one Conv3d per layer and fits a
CPU), and per output channel logits over the candidate shapes. In training each
channel's shape is sampled from its Gumbel-softmax, one-hot in the forward pass with
the softmax's gradient (straight-through); the kernel of channel ``o`` is the
super-kernel times the 0/1 footprint of its shape. In eval mode every channel takes its
most probable shape. Why hard samples and not the softmax-weighted mix of footprints:
with a mix, the super-kernel can undo any small weight by growing (every channel's
3x3x3 footprint stays in the mix), so the choice would say nothing about what the
channel needs; tried on the toy problem of the tests, the mix fitted a 2D teacher
perfectly with every channel "choosing" 1D.

``expected_parameters`` (and :func:`search_cost` over a network) is a differentiable
cost from the softmax to add to the loss: a channel on a 3x3x3 kernel can always mimic
a smaller one, so without a cost nothing pushes channels toward cheaper kernels.
``freeze()`` returns the plain configuration (each channel's most probable shape) and
``to_cakes()`` a :class:`Cakes` layer with it, its weights the super-kernel's slices and
the channel order kept (it equals the search layer in eval mode). :func:`freeze_search`
does that for a whole network in place. This is psc's reading of the paper's
channel-wise search (per-channel sub-kernels of a super-network, chosen under a cost
constraint); the Gumbel-softmax sampling and the form of the cost are psc's choices.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .conv_args import resolve_padding, triple

# Which axes a shape keeps at full size, in the canonical order (3D, 2D, 1D).
MASKS: tuple[tuple[int, int, int], ...] = (
    (1, 1, 1),
    (0, 1, 1), (1, 0, 1), (1, 1, 0),
    (1, 0, 0), (0, 1, 0), (0, 0, 1),
)
PRESETS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "2d": MASKS[1:4],
    "1d": MASKS[4:7],
    "3d": MASKS[:1],
    "mix": MASKS,
}
DEFAULT_PRESET = "2d"


def _check_kernel(kernel) -> tuple[int, int, int]:
    """Odd and at least 3 on every axis: a size-1 axis would make two shapes one."""
    kernel = triple(kernel, "kernel_size")
    if any(k < 3 or k % 2 == 0 for k in kernel):
        raise ValueError(f"kernel_size must be odd and at least 3 on every axis, got {kernel}")
    return kernel


def shape_of(mask: tuple[int, int, int], kernel: tuple[int, int, int]) -> tuple[int, int, int]:
    return tuple(k if m else 1 for m, k in zip(mask, kernel))  # type: ignore[return-value]


def shape_name(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _mask_of(key, kernel: tuple[int, int, int]) -> tuple[int, int, int]:
    """A configuration key ("1x3x3" or (1, 3, 3)) as the mask of the axes it keeps."""
    if isinstance(key, str):
        try:
            shape = tuple(int(v) for v in key.lower().split("x"))
        except ValueError:
            raise ValueError(f"kernel shape {key!r}: write it as '1x3x3'") from None
    else:
        shape = tuple(int(v) for v in key)
    if len(shape) != 3 or any(s not in (1, k) for s, k in zip(shape, kernel)):
        raise ValueError(f"kernel shape {key!r}: each entry must be 1 or the kernel size {kernel}")
    mask = tuple(int(s == k) for s, k in zip(shape, kernel))
    if not any(mask):
        raise ValueError(f"kernel shape {key!r} is 1x1x1: not a shrunk 3D kernel")
    return mask  # type: ignore[return-value]


def _largest_remainder(weights: Sequence[float], total: int) -> list[int]:
    exact = [w * total for w in weights]
    counts = [math.floor(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def resolve_config(config, out_channels: int, kernel: int | Sequence[int] = 3) -> dict[tuple[int, int, int], int]:
    """Channel count per kernel shape, canonical order, empty shapes left out (see the
    module doc for what ``config`` may be)."""
    kernel = _check_kernel(kernel)
    if config is None:
        config = DEFAULT_PRESET
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown CAKES preset {config!r}; use one of {', '.join(PRESETS)} or a dict")
        masks = PRESETS[config]
        base, rest = divmod(out_channels, len(masks))  # even split, remainder to the first shapes
        counts = [base + (i < rest) for i in range(len(masks))]
        items = list(zip(masks, counts))
    else:
        pairs = list(config.items()) if isinstance(config, Mapping) else [tuple(p) for p in config]
        if not pairs:
            raise ValueError("a CAKES configuration needs at least one kernel shape")
        given = {}
        for key, value in pairs:
            mask = _mask_of(key, kernel)
            if mask in given:
                raise ValueError(f"a kernel shape appears twice in {config!r}")
            given[mask] = value
        masks = [m for m in MASKS if m in given]  # canonical order: rounding ties go to the earlier shape
        values = [given[m] for m in masks]
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in values):
            raise ValueError(f"CAKES values must be non-negative counts or fractions, got {values}")
        if all(isinstance(v, int) for v in values):
            if sum(values) != out_channels:
                raise ValueError(f"channel counts {values} sum to {sum(values)}, not out_channels={out_channels} "
                                 "(give fractions, e.g. 0.5, to split any width)")
            counts = list(values)
        else:
            if sum(values) <= 0:
                raise ValueError(f"CAKES fractions must not all be zero, got {values}")
            counts = _largest_remainder([v / sum(values) for v in values], out_channels)
        items = list(zip(masks, counts))
    by_mask = dict(items)
    return {shape_of(m, kernel): by_mask[m] for m in MASKS if by_mask.get(m, 0) > 0}


def config_parameters(in_channels: int, config: Mapping[tuple[int, int, int], int], bias: bool = True) -> int:
    """The parameter rule of the module doc, for a resolved configuration."""
    weights = in_channels * sum(count * math.prod(shape) for shape, count in config.items())
    return weights + (sum(config.values()) if bias else 0)


def _group_geometry(shape, kernel, padding) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(conv padding, input crop) per axis for a group of kernel ``shape`` that must give
    the output of a ``kernel``-sized Conv3d with ``padding``."""
    pads, crops = [], []
    for s, k, p in zip(shape, kernel, padding):
        q = p - (k - s) // 2
        pads.append(max(q, 0))
        crops.append(max(-q, 0))
    return tuple(pads), tuple(crops)  # type: ignore[return-value]


def _crop(x: torch.Tensor, crops: tuple[int, int, int]) -> torch.Tensor:
    for axis, c in enumerate(crops):
        if c:
            x = x.narrow(2 + axis, c, x.shape[2 + axis] - 2 * c)
    return x


class Cakes(nn.Module):
    """Output channels split over 3D, 2D and 1D sub-kernels (see the module doc).

    Call signature matches ``nn.Conv3d`` where it overlaps (no dilation, no groups), so
    backbones and :func:`psc.models.replace_conv3d` can swap it in.
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
        config=None,
        channel_order: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"out_channels must be positive, got {out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _check_kernel(kernel_size)
        self.stride = triple(stride, "stride")
        self.padding = resolve_padding(padding, self.kernel_size)
        self.shapes_and_counts = resolve_config(config, out_channels, self.kernel_size)
        self.groups = nn.ModuleList()
        self.crops: list[tuple[int, int, int]] = []
        for shape, count in self.shapes_and_counts.items():
            pad, crop = _group_geometry(shape, self.kernel_size, self.padding)
            self.groups.append(nn.Conv3d(in_channels, count, shape, stride=self.stride, padding=pad, bias=bias))
            self.crops.append(crop)
        if channel_order is not None:
            order = torch.as_tensor(channel_order, dtype=torch.long).flatten()
            if sorted(order.tolist()) != list(range(out_channels)):
                raise ValueError(f"channel_order must be a permutation of 0..{out_channels - 1}")
            self.register_buffer("gather", order)
        else:
            self.gather = None

    @property
    def config(self) -> dict[tuple[int, int, int], int]:
        """The resolved configuration: channel count per kernel shape."""
        return dict(self.shapes_and_counts)

    def group_channels(self) -> list[torch.Tensor]:
        """For each group, the layer's output channels it computes, in its own order."""
        starts = [0]
        for count in self.shapes_and_counts.values():
            starts.append(starts[-1] + count)
        positions = torch.arange(self.out_channels)
        if self.gather is not None:  # output c is concatenated channel gather[c]
            positions = torch.argsort(self.gather.cpu())
        return [positions[a:b] for a, b in zip(starts[:-1], starts[1:])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [group(_crop(x, crop)) for group, crop in zip(self.groups, self.crops)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if self.gather is not None:
            y = y.index_select(1, self.gather)
        return y

    @torch.no_grad()
    def load_conv3d(self, conv: nn.Conv3d) -> float:
        """Set every group from ``conv``'s weights: each output channel keeps the slice of
        its kernel its shape covers (centred), and its bias. Exact where a channel's
        shape is the full kernel. Returns the relative kernel error ||W - W'|| / ||W||
        (the energy of the taps the shrinking drops)."""
        _check_source(self, conv)
        weight = conv.weight.detach()
        kept = torch.zeros_like(weight)
        for group, rows, shape in zip(self.groups, self.group_channels(), self.shapes_and_counts):
            index = tuple(slice((k - s) // 2, (k - s) // 2 + s) for s, k in zip(shape, self.kernel_size))
            part = weight[rows.to(weight.device)][(slice(None), slice(None), *index)]
            group.weight.copy_(part)
            kept[(rows.to(weight.device), slice(None), *index)] = part
            if group.bias is not None and conv.bias is not None:
                group.bias.copy_(conv.bias[rows.to(weight.device)])
            elif group.bias is not None:
                group.bias.zero_()
        return float((weight - kept).norm() / weight.norm().clamp_min(1e-30))

    def extra_repr(self) -> str:
        groups = ", ".join(f"{shape_name(s)}: {c}" for s, c in self.shapes_and_counts.items())
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, config={{{groups}}}" + (", reordered" if self.gather is not None else ""))


def _check_source(layer, conv: nn.Conv3d) -> None:
    if type(conv) is not nn.Conv3d:
        raise TypeError(f"expected an nn.Conv3d, got {type(conv).__name__}")
    same = (conv.in_channels == layer.in_channels and conv.out_channels == layer.out_channels
            and tuple(conv.kernel_size) == layer.kernel_size and tuple(conv.stride) == layer.stride
            and resolve_padding(conv.padding if isinstance(conv.padding, str) else tuple(conv.padding),
                                tuple(conv.kernel_size)) == layer.padding
            and tuple(conv.dilation) == (1, 1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")
    if not same:
        raise ValueError(f"{conv} does not have this layer's geometry ({layer.extra_repr()})")


def candidate_masks(candidates, kernel) -> tuple[tuple[int, int, int], ...]:
    """The search's candidate shapes as masks, canonical order: ``None`` (all seven), a
    preset name, or kernel shapes as in a configuration."""
    if candidates is None:
        return MASKS
    if isinstance(candidates, str):
        if candidates not in PRESETS:
            raise ValueError(f"unknown CAKES preset {candidates!r}; use one of {', '.join(PRESETS)}")
        return PRESETS[candidates]
    chosen = {_mask_of(key, kernel) for key in candidates}
    if not chosen:
        raise ValueError("the search needs at least one candidate shape")
    return tuple(m for m in MASKS if m in chosen)


class CakesSearch(nn.Module):
    """The differentiable CAKES layer: a 3x3x3 super-kernel and, per output channel, a
    softmax over the candidate sub-kernel shapes (see the module doc).

    ``weight`` and ``bias`` are ordinary weights; ``arch_logits`` (out, candidates) are
    the architecture parameters (:func:`arch_parameters` collects them, e.g. for their
    own optimiser). ``temperature`` is the Gumbel-softmax's (lower it to sharpen the
    samples as the search goes on); ``probabilities`` and the cost use it too.
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
        candidates=None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _check_kernel(kernel_size)
        self.stride = triple(stride, "stride")
        self.padding = resolve_padding(padding, self.kernel_size)
        self.shapes: list[tuple[int, int, int]] = [shape_of(m, self.kernel_size)
                                                   for m in candidate_masks(candidates, self.kernel_size)]
        self.temperature = float(temperature)
        full = nn.Conv3d(in_channels, out_channels, self.kernel_size, bias=bias)  # Conv3d's initialisation
        self.weight = nn.Parameter(full.weight.detach().clone())
        self.bias = nn.Parameter(full.bias.detach().clone()) if bias else None
        self.arch_logits = nn.Parameter(torch.zeros(out_channels, len(self.shapes)))
        footprints = torch.zeros(len(self.shapes), *self.kernel_size)
        for i, shape in enumerate(self.shapes):
            index = tuple(slice((k - s) // 2, (k - s) // 2 + s) for s, k in zip(shape, self.kernel_size))
            footprints[(i, *index)] = 1.0
        self.register_buffer("footprints", footprints, persistent=False)
        self.register_buffer("taps", footprints.flatten(1).sum(1), persistent=False)

    def probabilities(self) -> torch.Tensor:
        """(out_channels, candidates): each channel's softmax over the shapes."""
        return torch.softmax(self.arch_logits / self.temperature, dim=1)

    def selection(self) -> torch.Tensor:
        """(out_channels, candidates), one-hot per channel: in training a sample from
        each channel's Gumbel-softmax, with the softmax's gradient (straight-through);
        in eval mode each channel's most probable shape."""
        if self.training:
            return F.gumbel_softmax(self.arch_logits, tau=self.temperature, hard=True, dim=1)
        return F.one_hot(self.arch_logits.argmax(dim=1), len(self.shapes)).to(self.weight.dtype)

    def kernel(self) -> torch.Tensor:
        """Per channel, the super-kernel cut to the selected shape's footprint."""
        mix = self.selection() @ self.footprints.flatten(1)
        return self.weight * mix.view(self.out_channels, 1, *self.kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.kernel(), self.bias, self.stride, self.padding)

    def expected_parameters(self) -> torch.Tensor:
        """Differentiable: the weights the frozen layer is expected to have (the rule of
        the module doc with each channel's shape drawn from its softmax)."""
        return self.in_channels * (self.probabilities() @ self.taps).sum()

    def full_parameters(self) -> int:
        """The weights of the super-kernel (the 3x3x3 layer): the cost's scale."""
        return self.in_channels * self.out_channels * math.prod(self.kernel_size)

    def choice(self) -> torch.Tensor:
        """Each output channel's most probable candidate (index into ``shapes``)."""
        return self.arch_logits.detach().argmax(dim=1)

    def freeze(self) -> dict[tuple[int, int, int], int]:
        """The plain configuration the search has reached: channels per kernel shape."""
        counts = torch.bincount(self.choice().cpu(), minlength=len(self.shapes)).tolist()
        return {shape: count for shape, count in zip(self.shapes, counts) if count}

    @torch.no_grad()
    def to_cakes(self) -> Cakes:
        """A :class:`Cakes` layer with the frozen configuration, output channels in this
        layer's order, and as weights the super-kernel's slices: it computes what this
        layer computes in eval mode, with each channel's kernel only as large as its shape."""
        choice = self.choice().cpu()
        config = self.freeze()
        start, position = {}, torch.empty(self.out_channels, dtype=torch.long)
        offset = 0
        for shape, count in config.items():
            start[shape] = offset
            offset += count
        for o in range(self.out_channels):
            shape = self.shapes[int(choice[o])]
            position[o] = start[shape]
            start[shape] += 1
        order = None if torch.equal(position, torch.arange(self.out_channels)) else position
        layer = Cakes(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                      bias=self.bias is not None, config={s: c for s, c in config.items()}, channel_order=order)
        layer.to(device=self.weight.device, dtype=self.weight.dtype)
        kernel = self.weight
        for group, rows, shape in zip(layer.groups, layer.group_channels(), layer.shapes_and_counts):
            index = tuple(slice((k - s) // 2, (k - s) // 2 + s) for s, k in zip(shape, self.kernel_size))
            rows = rows.to(kernel.device)
            group.weight.copy_(kernel[rows][(slice(None), slice(None), *index)])
            if group.bias is not None:
                group.bias.copy_(self.bias[rows])
        layer.train(self.training)
        return layer

    @torch.no_grad()
    def load_conv3d(self, conv: nn.Conv3d) -> float:
        """Start the search from a trained Conv3d: its kernel becomes the super-kernel.
        Returns 0.0 (the super-kernel holds the whole kernel)."""
        _check_source(self, conv)
        self.weight.copy_(conv.weight)
        if self.bias is not None:
            self.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(self.bias))
        return 0.0

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, candidates=[{', '.join(shape_name(s) for s in self.shapes)}], "
                f"temperature={self.temperature}")


def search_layers(model: nn.Module) -> Iterable[tuple[str, CakesSearch]]:
    return ((name, m) for name, m in model.named_modules() if isinstance(m, CakesSearch))


def arch_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The architecture parameters of every search layer in ``model``."""
    return [layer.arch_logits for _, layer in search_layers(model)]


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of ``model`` that is not an architecture parameter."""
    arch = {id(p) for p in arch_parameters(model)}
    return [p for p in model.parameters() if id(p) not in arch]


def search_cost(model: nn.Module) -> torch.Tensor:
    """Differentiable cost of the search layers: expected weights over the weights of
    their 3x3x3 super-kernels (1.0 = every channel 3D; the "2d" preset is 1/3)."""
    layers = [layer for _, layer in search_layers(model)]
    if not layers:
        raise ValueError("the model has no CakesSearch layer")
    expected = sum(layer.expected_parameters() for layer in layers)
    return expected / sum(layer.full_parameters() for layer in layers)


def freeze_search(model: nn.Module) -> dict[str, dict[tuple[int, int, int], int]]:
    """Replace, in place, every :class:`CakesSearch` in ``model`` by its frozen
    :class:`Cakes` layer; returns each layer's configuration by module name (a
    ``per_layer`` for :func:`psc.models.replace_conv3d` to rebuild the architecture
    from a plain network)."""
    configs = {}
    for name, layer in list(search_layers(model)):
        configs[name] = layer.freeze()
        frozen = layer.to_cakes()
        if not name:
            raise ValueError("freeze the search layer itself with layer.to_cakes()")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, frozen)
    return configs
