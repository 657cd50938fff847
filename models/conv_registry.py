"""The convolution registry: one name per kind of 3x3x3 convolution.

Backbones never construct a convolution themselves; they receive a builder (the
torchvision ``conv_builder`` / nnU-Net ``conv_op`` pattern) so that a new kind of
convolution can be swapped in without forking the network. ``make_conv`` turns a
name into that builder:

* ``"conv3d"``: ``nn.Conv3d``;
* ``"p{m}sc{n}"``: PmSCn, m parallel streams of n 2D + one 1D convolution
  (``models/pmscn.py``);
* ``"cakes"`` and the presets ``"cakes-2d"`` (the default split), ``"cakes-1d"``,
  ``"cakes-3d"``, ``"cakes-mix"``: CAKES channel-wise shrunk kernels
  (``models/cakes.py``); option ``config=`` (a dict of kernel shape -> count or
  fraction, or a preset name);
* ``"cakes-search"``: the differentiable CAKES search layer; options ``candidates=``,
  ``temperature=``;
* ``"jfd"`` (2 axial x 6 planar atoms) and ``"jfd{A}x{B}"``: joint filter decomposition
  (``models/jfd.py``); options ``axial_atoms=``, ``planar_atoms=``, ``axial_dilation=``,
  ``axis=``.

Options are given as ``make_conv(name, **options)`` or ``builder.with_options(...)`` and
apply to every layer the builder makes; a configuration per layer goes through
:func:`psc.models.replace_conv3d`'s ``per_layer`` (by module name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .cakes import PRESETS as CAKES_PRESETS
from .cakes import Cakes, CakesSearch
from .jfd import DEFAULT_AXIAL_ATOMS, DEFAULT_PLANAR_ATOMS, JointFilterDecomposition
from .pmscn import PmSCn

_PMSCN_NAME = re.compile(r"^p([1-3])sc([1-9][0-9]*)$")
_JFD_NAME = re.compile(r"^jfd(?:([1-9][0-9]*)x([1-9][0-9]*))?$")
_CAKES_NAME = re.compile(r"^cakes(?:-(" + "|".join(CAKES_PRESETS) + r"))?$")

# The options each kind takes (anything else is a mistake, reported when the builder is made).
_OPTIONS = {
    "conv3d": (),
    "pmscn": (),
    "cakes": ("config",),
    "cakes-search": ("candidates", "temperature"),
    "jfd": ("axial_atoms", "planar_atoms", "axial_dilation", "axis"),
}


def _frozen(value):
    """Options live in a frozen (hashable) builder: dicts and lists become tuples."""
    if isinstance(value, dict):
        return tuple((_frozen(k), _frozen(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class ConvBuilder:
    """A constructor with ``nn.Conv3d``'s call signature.

    ``convs_per_block`` says how many consecutive plain convolutions one module
    built by it stands for: ``n`` for ``p{m}sc{n}``, 1 for every other kind.
    ``kind`` is one of ``conv3d``, ``pmscn``, ``cakes``, ``cakes-search``, ``jfd``;
    ``options`` the keyword options (frozen) passed to every module it builds.
    """

    name: str
    m: int = 0
    n: int = 1
    kind: str = ""
    options: tuple = ()

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", "pmscn" if self.m > 0 else "conv3d")
        unknown = [key for key, _ in self.options if key not in _OPTIONS[self.kind]]
        if unknown:
            allowed = ", ".join(_OPTIONS[self.kind]) or "none"
            raise ValueError(f"{self.name} takes no option {unknown[0]!r} (options: {allowed})")

    @property
    def convs_per_block(self) -> int:
        return self.n

    @property
    def is_separable(self) -> bool:
        return self.m > 0

    @property
    def loads_conv3d(self) -> bool:
        """Whether the modules it builds can be set from a Conv3d's weights
        (``load_conv3d``; for conv3d, a copy)."""
        return self.kind in ("conv3d", "cakes", "cakes-search", "jfd")

    def with_options(self, **options) -> "ConvBuilder":
        """The same builder with ``options`` added (or replaced)."""
        merged = dict(self.options)
        merged.update({key: _frozen(value) for key, value in options.items()})
        return ConvBuilder(self.name, self.m, self.n, self.kind, tuple(merged.items()))

    def __call__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size=3,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
    ) -> nn.Module:
        if self.kind == "conv3d":
            return nn.Conv3d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        if dilation not in (1, (1, 1, 1)) or groups != 1:
            raise ValueError(f"{self.name} supports neither dilation nor groups")
        options = dict(self.options)
        if self.kind == "cakes":
            return Cakes(in_channels, out_channels, kernel_size, stride, padding, bias, **options)
        if self.kind == "cakes-search":
            return CakesSearch(in_channels, out_channels, kernel_size, stride, padding, bias, **options)
        if self.kind == "jfd":
            return JointFilterDecomposition(in_channels, out_channels, kernel_size, stride, padding, bias,
                                            **options)
        if not isinstance(kernel_size, int):
            if len(set(kernel_size)) != 1:
                raise ValueError(f"{self.name} needs a cubic kernel, got {kernel_size}")
            kernel_size = kernel_size[0]
        if not isinstance(padding, (int, str)):
            if len(set(padding)) != 1:
                raise ValueError(f"{self.name} needs the same padding on every axis, got {padding}")
            padding = padding[0]
        return PmSCn(in_channels, out_channels, m=self.m, n=self.n, kernel_size=kernel_size,
                     stride=stride, padding=padding, bias=bias)


def make_conv(name: str | ConvBuilder, **options) -> ConvBuilder:
    """Builder for a registry name (module doc), with ``options`` for every module it builds."""
    if isinstance(name, ConvBuilder):
        return name.with_options(**options) if options else name
    key = str(name).strip().lower()
    if key == "conv3d":
        builder = ConvBuilder("conv3d")
    elif (match := _PMSCN_NAME.match(key)) is not None:
        builder = ConvBuilder(key, m=int(match.group(1)), n=int(match.group(2)))
    elif key == "cakes-search":
        builder = ConvBuilder(key, kind="cakes-search")
    elif (match := _CAKES_NAME.match(key)) is not None:
        builder = ConvBuilder(key, kind="cakes", options=(("config", match.group(1) or "2d"),))
    elif (match := _JFD_NAME.match(key)) is not None:
        axial, planar = (int(match.group(1)), int(match.group(2))) if match.group(1) else (
            DEFAULT_AXIAL_ATOMS, DEFAULT_PLANAR_ATOMS)
        builder = ConvBuilder(key, kind="jfd", options=(("axial_atoms", axial), ("planar_atoms", planar)))
    else:
        raise ValueError(f"unknown convolution {name!r}: use 'conv3d', 'p{{m}}sc{{n}}' with m in 1..3, n >= 1, "
                         f"'cakes' ('cakes-{{{','.join(CAKES_PRESETS)}}}', 'cakes-search') or 'jfd' ('jfd{{A}}x{{B}}')")
    return builder.with_options(**options) if options else builder


# The variants the paper compares, in the order tables list them.
STANDARD_CONVS = ("conv3d", "p1sc1", "p2sc2", "p2sc3")
# The other members of the family psc implements, at their default configurations.
FAMILY_CONVS = ("cakes", "jfd")
