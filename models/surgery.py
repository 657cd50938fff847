"""Swap the 3x3x3 convolutions of any torch model for another convolution of the
registry (PmSCn, CAKES, joint filter decomposition), in place.

Works on models psc did not build (MONAI's UNet and DynUNet, a user's own net):
every ``nn.Conv3d`` with a 3x3x3 kernel, stride 1 or 2 per axis, no dilation, no
groups, zero padding of 1 ("same") or 0 ("valid", for ``n = 1`` only) is replaced by a module of the
same in/out channels and output size. Convolutions are replaced one by one; psc's
own backbones group consecutive convolutions into one ``p{m}sc{n}`` block, which a
generic walk over an unknown graph cannot do safely. Convolutions that are parts of a
registry layer already in the model (a CAKES group is an ``nn.Conv3d``) are not
touched, so replacing twice does not take a layer apart.

``per_layer`` gives builder options by module name (or a function of the name and the
Conv3d): a CAKES configuration per layer, e.g. the one a search froze to
(``psc.models.cakes.freeze_search``), rebuilt on the plain network. ``copy_weights``
sets each new layer from the Conv3d it replaces (``load_conv3d``: exact for
``jfd3x9`` and ``cakes-3d``, the central slices for other CAKES configurations, a
truncated HOSVD for fewer atoms); the report then lists each layer's relative kernel
error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from torch import nn

from .cakes import Cakes, CakesSearch
from .complexity import count_parameters
from .conv_registry import ConvBuilder, make_conv
from .jfd import JointFilterDecomposition
from .pmscn import PmSCn

# Registry layers whose inner nn.Conv3d's are theirs, not the model's.
_REGISTRY_LAYERS = (PmSCn, Cakes, CakesSearch, JointFilterDecomposition)


@dataclass
class Replacement:
    name: str
    in_channels: int
    out_channels: int
    stride: tuple[int, int, int]
    params_before: int
    params_after: int
    kernel_error: float | None = None  # with copy_weights: ||W - W'|| / ||W||


@dataclass
class ReplacementReport:
    conv: str
    replaced: list[Replacement] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.replaced)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.replaced)

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} Conv3d by {self.conv}: "
                 f"{self.params_before:,} -> {self.params_after:,} parameters"]
        lines += [f"  {r.name}: {r.in_channels}->{r.out_channels} stride {r.stride} "
                  f"({r.params_before:,} -> {r.params_after:,})"
                  + ("" if r.kernel_error is None else f", kernel error {r.kernel_error:.2e}") for r in self.replaced]
        lines += [f"  kept {name}: {why}" for name, why in self.skipped]
        return "\n".join(lines)


def _why_not(conv: nn.Conv3d, builder: ConvBuilder) -> str | None:
    if tuple(conv.kernel_size) != (3, 3, 3):
        return f"kernel {tuple(conv.kernel_size)} is not 3x3x3"
    if any(s not in (1, 2) for s in conv.stride):
        return f"stride {tuple(conv.stride)}"
    if tuple(conv.dilation) != (1, 1, 1) or conv.groups != 1:
        return "dilated or grouped"
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) and conv.padding != "same":
        return f"padding {conv.padding!r} ({conv.padding_mode})"
    if not isinstance(conv.padding, str) and len(set(conv.padding)) != 1 or (
        not isinstance(conv.padding, str) and conv.padding[0] not in (0, 1)
    ):
        return f"padding {conv.padding}"
    if not isinstance(conv.padding, str) and conv.padding[0] == 0 and builder.convs_per_block > 1:
        return f"valid padding: a {builder.name} block trims {builder.convs_per_block * 2} voxels per axis, not 2"
    return None


def _inside_registry_layers(module: nn.Module) -> set[str]:
    prefixes = [name for name, child in module.named_modules() if isinstance(child, _REGISTRY_LAYERS)]
    return {name for name, _ in module.named_modules()
            if any(name.startswith(prefix + ".") or (prefix == "" and name) for prefix in prefixes)}


def replace_conv3d(
    module: nn.Module,
    conv: str | ConvBuilder = "p2sc2",
    per_layer: Mapping[str, Mapping] | Callable[[str, nn.Conv3d], Mapping | None] | None = None,
    copy_weights: bool = False,
) -> ReplacementReport:
    """Replace every eligible 3x3x3 ``nn.Conv3d`` inside ``module`` by ``conv``.

    ``per_layer``: builder options by module name, or a function ``(name, conv3d) ->
    options or None``; a name that is not an eligible convolution is an error (before
    anything is replaced). ``copy_weights``: set each new layer from the Conv3d's
    weights (kinds with ``load_conv3d``: conv3d, cakes, cakes-search, jfd)."""
    builder = make_conv(conv)
    if copy_weights and not builder.loads_conv3d:
        raise ValueError(f"{builder.name} cannot be set from a Conv3d's weights (use decompose_conv3d for PmSCn)")
    report = ReplacementReport(builder.name)
    inside = _inside_registry_layers(module)
    targets = [(name, child) for name, child in module.named_modules()
               if type(child) is nn.Conv3d and name not in inside]
    eligible = {name for name, old in targets if _why_not(old, builder) is None}
    if isinstance(per_layer, Mapping):
        unknown = sorted(set(per_layer) - eligible)
        if unknown:
            raise ValueError(f"per_layer names {unknown[0]!r}, which is not a replaceable 3x3x3 Conv3d of the model")
    for name, old in targets:
        reason = _why_not(old, builder)
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        options = per_layer(name, old) if callable(per_layer) else (per_layer or {}).get(name)
        layer_builder = builder.with_options(**options) if options else builder
        padding = 1 if old.padding == "same" else old.padding[0]
        stride = tuple(old.stride)
        new = layer_builder(old.in_channels, old.out_channels, 3, stride=stride, padding=padding,
                            bias=old.bias is not None)
        new.to(device=old.weight.device, dtype=old.weight.dtype)
        error = None
        if copy_weights:
            if isinstance(new, nn.Conv3d):
                new.load_state_dict(old.state_dict())
                error = 0.0
            else:
                error = new.load_conv3d(old)
        new.train(old.training)
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, new)
        report.replaced.append(Replacement(name, old.in_channels, old.out_channels, stride, count_parameters(old),
                                           count_parameters(new), error))
    return report
