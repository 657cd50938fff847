"""What a benchmark ran on, printed above every table: numbers from different machines
(or from a loaded one) are not comparable, so each table carries its own."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from psc.pipelines.precision import cpu_has_native_bf16


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def machine_line(device: str | torch.device = "cpu") -> str:
    """One line: device, CPU features that decide bf16, cores, threads, torch, load."""
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    bf16 = "native bf16 (AVX512-BF16/AMX)" if cpu_has_native_bf16() else "no native bf16"
    return (f"device {torch.device(device)} ({device_name(device)}); CPU {cpu_model()}, {bf16}, "
            f"nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}; torch {torch.__version__}; "
            f"load average {load}")
