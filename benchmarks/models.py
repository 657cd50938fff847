"""Speed and memory of PmSCn blocks and backbones against plain Conv3d, side by side.

    python benchmarks/models.py [--quick] [--device cpu|cuda] [--threads N]

Time: median wall time of repeated calls after a warm-up (forward under
``torch.inference_mode``; forward+backward of a sum loss in training mode).
Memory: on CUDA the allocator's peak during forward+backward; on CPU, where torch
keeps no allocator statistics, the bytes of the tensors autograd saves for the
backward pass (``saved_tensors_hooks``; distinct storages counted once), which is
what training memory is made of. Ratios are to the conv3d row of the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psc.models import build_model, make_conv  # noqa: E402
from psc.pipelines.mri.config import BACKBONE_OPTIONS  # noqa: E402

CONVS = ("conv3d", "p1sc1", "p2sc2", "p2sc3")
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}


def saved_bytes(model, x, autocast) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(x).float().sum()
    return sum(storages.values())


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()
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


def measure(model, shape, layout, dtype, device, repeats) -> dict:
    model = model.to(device).to(memory_format=LAYOUTS[layout])
    x = torch.randn(shape, device=device).contiguous(memory_format=LAYOUTS[layout])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

    def forward():
        with torch.inference_mode(), autocast:
            model(x)

    def train_step():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model(x).float().sum()
        loss.backward()

    model.eval()
    fwd = timed(forward, repeats, device)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = timed(train_step, repeats, device)
    memory = torch.cuda.max_memory_allocated() if device.type == "cuda" else saved_bytes(model, x, autocast)
    return {"forward_s": fwd, "train_s": step, "memory_mb": memory / 2**20}


def cases(quick: bool):
    side = 40 if quick else 48
    for conv in CONVS:
        yield "block 32->32", conv, lambda c=conv: make_conv(c)(32, 32, 3, padding=1), (1, 32, side, side, side)
    side = 64 if quick else 96
    for conv in CONVS:
        yield "densenet3d (MRI config)", conv, (lambda c=conv: build_model("densenet3d", conv=c, **BACKBONE_OPTIONS)), \
            (1, 1, side, side, side)
    for conv in CONVS:
        yield "unet3d (same)", conv, (lambda c=conv: build_model("unet3d", conv=c, padding="same")), \
            (1, 1, side, side, side)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs, fewer repeats")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    repeats = 3 if args.quick else 5
    console = Console(width=140)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    console.print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")

    table = Table(title="forward / forward+backward time and memory, conv3d vs PmSCn")
    for column in ("what", "conv", "layout", "dtype", "params", "forward ms", "fwd+bwd ms", "memory MB",
                   "fwd / conv3d", "fwd+bwd / conv3d"):
        table.add_column(column, justify="left" if column in ("what", "conv", "layout", "dtype") else "right")
    base: dict[tuple, dict] = {}
    torch.manual_seed(0)
    for what, conv, make, shape in cases(args.quick):
        model = make()
        params = sum(p.numel() for p in model.parameters())
        for layout in args.layouts:
            for dtype in args.dtypes:
                r = measure(model, shape, layout, dtype, device, repeats)
                key = (what, layout, dtype)
                if conv == "conv3d":
                    base[key] = r
                b = base.get(key, r)
                table.add_row(what, conv, layout, dtype, f"{params:,}", f"{1000 * r['forward_s']:.1f}",
                              f"{1000 * r['train_s']:.1f}", f"{r['memory_mb']:.0f}",
                              f"{r['forward_s'] / b['forward_s']:.2f}", f"{r['train_s'] / b['train_s']:.2f}")
        table.add_section()
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
