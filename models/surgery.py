"""Swap the 3x3x3 convolutions of any torch model for PmSCn blocks, in place.

Works on models psc did not build (MONAI's UNet and DynUNet, a user's own net):
every ``nn.Conv3d`` with a 3x3x3 kernel, stride 1 or 2 per axis, no dilation, no
groups, zero padding of 1 ("same") or 0 ("valid", for ``n = 1`` only) is replaced by a module of the
same in/out channels and output size. Convolutions are replaced one by one; psc's
own backbones group consecutive convolutions into one ``p{m}sc{n}`` block, which a
generic walk over an unknown graph cannot do safely.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .complexity import count_parameters
from .conv_registry import ConvBuilder, make_conv


@dataclass
class Replacement:
    name: str
    in_channels: int
    out_channels: int
    stride: tuple[int, int, int]
    params_before: int
    params_after: int


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
                  f"({r.params_before:,} -> {r.params_after:,})" for r in self.replaced]
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


def replace_conv3d(module: nn.Module, conv: str | ConvBuilder = "p2sc2") -> ReplacementReport:
    """Replace every eligible 3x3x3 ``nn.Conv3d`` inside ``module`` by ``conv``."""
    builder = make_conv(conv)
    report = ReplacementReport(builder.name)
    targets = [(name, child) for name, child in module.named_modules() if type(child) is nn.Conv3d]
    for name, old in targets:
        reason = _why_not(old, builder)
        if reason is not None:
            report.skipped.append((name, reason))
            continue
        padding = 1 if old.padding == "same" else old.padding[0]
        stride = tuple(old.stride)
        new = builder(old.in_channels, old.out_channels, 3, stride=stride, padding=padding,
                      bias=old.bias is not None)
        new.to(device=old.weight.device, dtype=old.weight.dtype)
        new.train(old.training)
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, new)
        report.replaced.append(Replacement(name, old.in_channels, old.out_channels, stride, count_parameters(old),
                                           count_parameters(new)))
    return report
