"""The backbone registry (torchvision's ``register_model``/``list_models`` shape).

Each backbone module registers a builder ``fn(conv, in_channels, out_channels,
**options)``; ``build_model`` resolves the convolution name once so every backbone
receives a ready :class:`ConvBuilder`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from .conv_registry import ConvBuilder, make_conv

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_DEFAULTS: dict[str, dict] = {}


def register_model(name: str, **defaults) -> Callable:
    """Decorator: register a backbone builder under ``name`` with default options."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")
        _BUILDERS[name] = fn
        _DEFAULTS[name] = dict(defaults)
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_BUILDERS)


def model_defaults(name: str) -> dict:
    """The options ``build_model(name)`` uses when the caller gives none."""
    _check(name)
    return dict(_DEFAULTS[name])


def build_model(name: str, conv: str | ConvBuilder = "p2sc2", in_channels: int | None = None,
                out_channels: int | None = None, **options) -> nn.Module:
    """Build backbone ``name`` with every 3x3x3 convolution made by ``conv``."""
    _check(name)
    config = model_defaults(name)
    if in_channels is not None:
        config["in_channels"] = in_channels
    if out_channels is not None:
        config["out_channels"] = out_channels
    config.update(options)
    return _BUILDERS[name](conv=make_conv(conv), **config)


def _check(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
