"""Which device a network runs on, from the name a user gives (``auto``, ``cpu``,
``cuda``, ``cuda:N``). Shared by the MRI and EM pipelines, so both accept and refuse
the same names with the same message."""

from __future__ import annotations

import torch

from psc.utils.errors import InputError


def parse_device(name: str) -> torch.device | None:
    """The device ``name`` stands for, checked for form only (``None`` for ``auto``):
    what a scheduler can check for workers on machines whose GPUs it cannot see."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    return device


def resolve_device(name: str = "auto") -> torch.device:
    """The device ``name`` stands for on this machine: ``auto`` is a GPU when there is
    one; a CUDA device that is not there is refused."""
    device = parse_device(name)
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return device
