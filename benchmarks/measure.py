"""Time and memory of a call, the same way in every benchmark here.

* time: median wall time of ``repeats`` calls; on CUDA each call is bracketed by
  ``torch.cuda.synchronize`` so the GPU's queued work is counted.
* memory: the peak of bytes held by torch's allocator during one call, above what was
  held before it (weights and inputs are not counted; activations, convolution
  workspaces and autocast weight copies are). On CUDA that is
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU, where
  torch keeps no allocator statistics, it is replayed from the allocation and free
  events that ``torch.profiler`` records with ``profile_memory=True`` (running sum in
  time order, maximum taken). Memory held outside torch's allocator (oneDNN's own
  caches, the Python heap) is not seen, so this is not RSS.
"""

from __future__ import annotations

import statistics
import time

import torch

from psc.pipelines.silence import silenced


def peak_bytes(fn, device: torch.device) -> int:
    """Peak of allocator-held bytes during ``fn()``, above the bytes held before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with silenced(2), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()  # negative for a free
        peak = max(peak, live)
    return peak


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
