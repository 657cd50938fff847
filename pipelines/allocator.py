"""Keep freed memory in the process, so the next forward pass reuses it.

glibc's malloc serves every block above a threshold (at most 32 MB by its own dynamic
rule) with a fresh ``mmap`` and hands it back with ``munmap`` when it is freed. A
network's feature maps at brain size are tens to hundreds of MB each, so every forward
pass maps them again and the kernel zero-fills every page on first touch. On the
2-core development VM, repeated forward passes of the shipped models in bf16 took
2.2-2.4 s (MRI DenseNet, brain-sized crop) and 82-86 ms (EM U-Net, one block) that way,
against 1.2-1.8 s and 66-67 ms with the pages kept. Raising the mmap threshold (large blocks come from
the heap) and the trim threshold (the heap is not shrunk after each call) lets later
calls reuse the pages; it is what PyTorch's CPU performance guide gets by preloading
jemalloc or tcmalloc, done here with glibc's own ``mallopt``.

The cost is that the process keeps its peak memory until it exits, which is what a
command line that segments scan after scan, or an EM worker that predicts block after
block, wants. So the commands call :func:`keep_freed_memory`; importing psc as a library
(napari, a notebook) changes nothing. ``PSC_KEEP_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB from the heap
TRIM_THRESHOLD = (1 << 31) - 1  # the largest value mallopt's int takes: never trim in practice


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks for reuse (module doc). Returns whether it took
    effect: ``False`` off Linux/glibc (musl, macOS, Windows) or when turned off."""
    if os.environ.get("PSC_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
