"""Inference throughput and memory of every backbone x convolution, side by side in one
run: conv3d against p1sc1 / p2sc2 / p2sc3, at equal width and at equal parameter
count, and against MONAI's UNet of about the same size.

    python benchmarks/inference.py [--device cpu|cuda] [--threads N] [--precision fp32 bf16 ...]
                                   [--tasks mri em] [--quick] [--compile]

Tasks (the inputs psc's pipelines really give their networks):

* **mri**: ``densenet3d`` with the MRI options (``pipelines/mri/config.py``) on a
  whole-brain crop in model space, 1 x 1 x 144 x 128 x 160 voxels (one window, as
  ``psc-segment`` runs an adult brain); 4 classes.
* **em**: ``unet3d`` with the EM options (``pipelines/em/train.py``), valid
  convolutions, on one 64^3 output block grown by the network's context; 3 affinities.

Rows per task:

* ``conv3d`` and each PmSCn at the **same channel widths** ("width"): the backbone as
  built by ``build_model``;
* each PmSCn again with every channel width scaled by one factor so that its parameter
  count is closest to conv3d's ("params");
* ``monai-unet``: ``monai.networks.nets.UNet`` (3 levels, 2 residual units, same
  padding) with the first level's channels chosen for about conv3d's parameter count.
  Its output has the size of its input, so for the em task it computes more output
  voxels than the valid U-Net, and they count in its throughput.

Columns: parameters; MACs per output voxel (``psc.models.macs_per_output_voxel``);
throughput in output megavoxels per second (median of ``--repeats`` calls after one
warm-up call, ``torch.inference_mode``, channels_last_3d, convolution + ReLU fused by
``fuse_for_inference`` as psc's pipelines run them); achieved GFLOP/s (2 x MACs /
time: on a GPU compare it with the device's peak); peak MB (allocator bytes above
weights and input, see ``measure.py``); "x conv3d": the row's time over the conv3d
row's of the same task and precision (below 1 is faster). ``--compile`` adds rows with
``torch.compile`` (inductor; on CPU with weight freezing) and prints how long each
compilation took.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psc.models import build_model, count_parameters, fuse_for_inference, macs_per_output_voxel  # noqa: E402
from psc.pipelines.em.train import BACKBONE_OPTIONS as EM_OPTIONS  # noqa: E402
from psc.pipelines.mri.config import BACKBONE_OPTIONS as MRI_OPTIONS  # noqa: E402
from psc.pipelines.precision import autocast, precision_name, resolve_precision  # noqa: E402

from machine import machine_line  # noqa: E402  (benchmarks/, first on sys.path)
from measure import peak_bytes, timed  # noqa: E402

PMSCN = ("p1sc1", "p2sc2", "p2sc3")
MRI_CROP = (144, 128, 160)
EM_BLOCK = 64


def scaled(options: dict, factor: float, keys: tuple[str, ...]) -> dict:
    """The backbone's options with every channel width in ``keys`` times ``factor``
    (at least 3, so three parallel streams still get a channel each)."""
    return {k: max(3, round(v * factor)) if k in keys else v for k, v in options.items()}


def equal_parameters(build, options: dict, keys: tuple[str, ...], target: int) -> tuple[dict, float]:
    """Options whose network has the parameter count closest to ``target``."""
    best = None
    for step in range(30, 201):
        factor = step / 100
        candidate = scaled(options, factor, keys)
        gap = abs(count_parameters(build(candidate)) - target)
        if best is None or gap < best[0]:
            best = (gap, candidate, factor)
    return best[1], best[2]


def monai_unet(in_channels: int, out_channels: int, target: int) -> torch.nn.Module:
    from monai.networks.nets import UNet

    def make(c):
        return UNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
                    channels=(c, 2 * c, 4 * c, 8 * c), strides=(2, 2, 2), num_res_units=2)

    c = min(range(4, 65), key=lambda c: abs(count_parameters(make(c)) - target))
    return make(c)


def input_shape(task: str, model: torch.nn.Module) -> tuple[int, ...]:
    """mri: the brain crop. em: the smallest cube whose valid output covers an EM_BLOCK
    block (each convolution type trims its own context, and p2sc3's valid outputs step
    past some sizes), or the block itself for a same-padded network."""
    if task == "mri" or not hasattr(model, "output_shape"):
        return (1, 1, *(MRI_CROP if task == "mri" else (EM_BLOCK,) * 3))
    for side in range(EM_BLOCK, EM_BLOCK + 400):
        try:
            if model.output_shape((side,) * 3)[0] >= EM_BLOCK:
                return (1, 1, side, side, side)
        except RuntimeError:  # too small to produce any output
            continue
    raise ValueError(f"no input gives a {EM_BLOCK}^3 output")


def cases(task: str):
    """(row label, width note, model factory) for one task."""
    if task == "mri":
        keys = ("init_channels", "growth_rate", "side_channels")
        options, classes = dict(MRI_OPTIONS), 4

        def build(conv, opts):
            return build_model("densenet3d", conv=conv, in_channels=1, out_channels=classes, **opts)
    else:
        keys = ("num_fmaps",)
        options, classes = dict(EM_OPTIONS), 3

        def build(conv, opts):
            return build_model("unet3d", conv=conv, **opts)
    reference = count_parameters(build("conv3d", options))
    yield "conv3d", "width", lambda: build("conv3d", options)
    for conv in PMSCN:
        yield conv, "width", (lambda c=conv: build(c, options))
    for conv in PMSCN:
        opts, factor = equal_parameters(lambda o, c=conv: build(c, o), options, keys, reference)
        yield conv, f"params (x{factor:.2f} wide)", (lambda c=conv, o=opts: build(c, o))
    yield "monai-unet", "params", lambda: monai_unet(1, classes, reference)


def measure_row(model, shape, dtype, device, repeats: int, compile_model: bool) -> dict:
    model = fuse_for_inference(model).to(device).to(memory_format=torch.channels_last_3d)
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last_3d)
    compile_s = float("nan")
    if compile_model:
        from torch._inductor import config as inductor

        inductor.freezing = device.type == "cpu"
        model = torch.compile(model, dynamic=False)  # one input shape; dynamic shapes failed in inductor here
    context = autocast(device, dtype) if dtype != torch.float32 else nullcontext()
    out = []

    def forward():
        with torch.inference_mode(), context:
            out[:] = [model(x)]

    start = time.perf_counter()
    forward()  # warm-up (and compilation)
    if compile_model:
        compile_s = time.perf_counter() - start
    voxels = out[0][0, 0].numel()
    seconds = timed(forward, repeats, device)
    out.clear()
    peak = peak_bytes(forward, device)
    out.clear()
    return {"seconds": seconds, "voxels": voxels, "peak_mb": peak / 2**20, "compile_s": compile_s}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--precision", nargs="+", default=None,
                        help="fp32 bf16 fp16 (default: fp32, plus auto's choice when it is not fp32)")
    parser.add_argument("--tasks", nargs="+", choices=("mri", "em"), default=["mri", "em"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="MRI on a 96^3 crop, EM on a 32^3 block, 2 repeats")
    parser.add_argument("--compile", action="store_true", help="add torch.compile rows")
    args = parser.parse_args(argv)
    global MRI_CROP, EM_BLOCK
    if args.quick:
        MRI_CROP, EM_BLOCK, args.repeats = (96, 96, 96), 32, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # autotune each convolution shape once
    precisions = args.precision or list(dict.fromkeys(["fp32", precision_name(resolve_precision("auto", device))]))
    console = Console(width=170)
    console.print(machine_line(device))
    table = Table(title="inference: conv3d vs PmSCn vs MONAI UNet, one run",
                  caption=f"mri: densenet3d on 1x1x{'x'.join(map(str, MRI_CROP))}; em: valid unet3d, one "
                          f"{EM_BLOCK}^3 output block. 'x conv3d': time / conv3d's time, same task and precision.")
    for column in ("task", "model", "widths", "precision", "compiled", "params", "kMAC/vox", "Mvox/s", "GFLOP/s",
                   "peak MB", "x conv3d", "compile s"):
        table.add_column(column, no_wrap=True, justify="left" if column in
                         ("task", "model", "widths", "precision", "compiled") else "right")
    started = time.perf_counter()
    for task in args.tasks:
        base: dict[tuple, float] = {}
        for name, widths, make in cases(task):
            torch.manual_seed(0)
            model = make()
            shape = input_shape(task, model)
            kmacs = macs_per_output_voxel(copy.deepcopy(model), (32, 32, 32) if task == "mri" else shape[2:], 1) / 1000
            for precision in precisions:
                dtype = resolve_precision(precision, device)
                for compiled in ((False, True) if args.compile else (False,)):
                    r = measure_row(copy.deepcopy(model), shape, dtype, device, args.repeats, compiled)
                    key = (precision, compiled)
                    if name == "conv3d":
                        base[key] = r["seconds"]
                    mvox = r["voxels"] / r["seconds"] / 1e6
                    gflops = 2 * kmacs * 1e3 * r["voxels"] / r["seconds"] / 1e9
                    table.add_row(task, name, widths, precision, "yes" if compiled else "no",
                                  f"{count_parameters(model):,}", f"{kmacs:.1f}", f"{mvox:.2f}",
                                  f"{gflops:.0f}",
                                  f"{r['peak_mb']:,.0f}", f"{r['seconds'] / base[key]:.2f}",
                                  "-" if r["compile_s"] != r["compile_s"] else f"{r['compile_s']:.0f}")
            table.add_section()
    console.print(table)
    console.print(f"total {time.perf_counter() - started:.0f} s; {machine_line(device)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
