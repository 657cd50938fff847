"""What every ``psc-segment`` run takes, whichever pipeline runs it: the weights, the
device, the precision and whether existing outputs are replaced. Each pipeline's own
options extend this (``psc.pipelines.mri.options.MRISegmentOptions``,
``psc.pipelines.em.options.EMRunOptions``); the command line builds its defaults and its
``--help`` from these fields, so each default is written once, here."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SegmentOptions:
    weights: Path | None = None  # None: the shipped model of the pipeline's kind (psc.models.shipped)
    device: str = "auto"  # auto, cpu, cuda or cuda:N (psc.pipelines.devices)
    precision: str = "auto"  # auto, fp32, bf16, fp16 (psc.pipelines.precision)
    force: bool = False  # replace existing outputs


def option_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``cls`` (a default factory called)."""
    for item in fields(cls):
        if item.name == name:
            if item.default is not MISSING:
                return item.default
            if item.default_factory is not MISSING:
                return item.default_factory()
            raise KeyError(f"{cls.__name__}.{name} has no default")
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def own_options(cls: type, base: type = SegmentOptions) -> tuple[str, ...]:
    """The fields of ``cls`` that ``base`` does not have: the options only that pipeline takes."""
    shared = {item.name for item in fields(base)}
    return tuple(item.name for item in fields(cls) if item.name not in shared)
