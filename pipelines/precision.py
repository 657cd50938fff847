"""The floating-point precision a network runs in, chosen per device.

Lower precision is worth it only where the hardware computes in it natively: CUDA
GPUs (fp16 tensor cores), and CPUs with AVX512-BF16 or AMX tiles, where oneDNN has
real bf16 kernels. Elsewhere bf16 is emulated and no faster than fp32, so ``auto``
stays in fp32 there.

psc runs the lower precision as ``autocast``: the weights stay fp32 and only the
convolutions run in bf16/fp16. A copy of the whole network cast to bf16 was tried as
well: for the MRI DenseNet on a brain-sized input (160 x 136 x 152 voxels, 2 CPU cores,
AMX) it takes 3.5 s per forward against 4.3 s under autocast (5.2 s in fp32),
but its labels agree with fp32 on only 99.92-99.94 % of brain voxels, against
99.95-99.98 % under autocast, too close to the 99.9 % bar to hold on every CPU.
Whether the precision keeps the answer is checked by tests, not assumed.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from psc.utils.errors import InputError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU features behind oneDNN's fast bf16 convolutions.
    torch exposes the checks privately (``torch.cpu._is_*_supported``); a torch without
    them is treated as a CPU without the feature."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def check_precision(name: str) -> str:
    """``name`` if it is one of PRECISIONS (what a run stores before any device is known)."""
    if name not in PRECISIONS:
        raise InputError(f"unknown precision {name!r}: use {', '.join(PRECISIONS)}")
    return name


def resolve_precision(name: str, device: torch.device | str) -> torch.dtype:
    """``auto``: fp16 on CUDA, bf16 on a CPU with native bf16, else fp32. An explicit
    name is honoured on any device (emulated bf16 is slow, not wrong)."""
    if check_precision(name) != "auto":
        return DTYPES[name]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def autocast(device: torch.device | str, dtype: torch.dtype):
    """A context running the network in ``dtype`` on ``device`` (nothing for fp32)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def precision_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)
