"""Speed, memory and numerical agreement of PmSCn, CAKES and joint-filter-decomposition
blocks and backbones against plain Conv3d, side by side, per memory layout and dtype, at
equal width and at equal parameter count.

    python benchmarks/models.py [--quick] [--device cpu|cuda] [--threads N] [--match width params]

What is measured, per (model, conv, layout, dtype):

* time: median wall time of ``--repeats`` calls after one warm-up call. "forward" is
  an eval-mode call under ``torch.inference_mode``; "fwd+bwd" is a training-mode
  step: ``zero_grad``, forward, ``.float().sum()`` loss, backward (no optimizer).
  On CUDA every call is bracketed by ``torch.cuda.synchronize``.
* memory: the peak of bytes held by torch's allocator during one more call, above
  what was held before it (so weights and input are not counted; activations,
  convolution workspaces, autocast weight copies and gradients are). On CUDA that is
  ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``; on CPU, where
  torch keeps no allocator statistics, it is replayed from the allocation and free
  events that ``torch.profiler`` records with ``profile_memory=True`` (running sum in
  time order, maximum taken; this does see native-path workspaces such as
  ``slow_conv3d``'s im2col buffer). Memory held outside torch's allocator (oneDNN's
  own caches, the Python heap) is not seen. Reported for inference ("fwd MB") and
  training ("train MB").
* size: parameters, and forward multiply-accumulates per output voxel ("kMAC/vox",
  counted by ``psc.models.macs_per_output_voxel``, i.e. torch's ``FlopCounterMode``).
* agreement: max |y - y_ref| / max |y_ref| of the eval-mode output against the same
  model's fp32 contiguous output; it tells a fast layout or dtype that changes the
  answer from one that does not.

Rows ("widths" column):

* ``width``: every convolution at the same channel widths (the block 32 -> 32, the
  backbones as configured);
* ``params``: every convolution but conv3d with its widths scaled so its parameter
  count is closest to the conv3d row's (the block: in = out channels chosen; the
  backbones: every channel width times one factor, found by a coarse-then-fine scan).
  The input of a block row has that block's channel count.

Every configuration starts from the same weights and batch-norm statistics (the
state dict is reloaded, since training-mode steps move the running statistics).
Ratios are to the conv3d row of the same model, layout and dtype in the same run.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psc.models import build_model, count_parameters, macs_per_output_voxel, make_conv  # noqa: E402
from psc.pipelines.mri.config import BACKBONE_OPTIONS, INFERENCE_WINDOW, PATCH_SIZE  # noqa: E402

from machine import cpu_model  # noqa: E402  (benchmarks/, first on sys.path)
from measure import peak_bytes, timed  # noqa: E402

CONVS = ("conv3d", "p1sc1", "p2sc2", "p2sc3", "cakes", "jfd")
MATCHES = ("width", "params")
BLOCK_WIDTH = 32
# The channel widths scaled for the equal-parameter rows of each backbone.
WIDTH_KEYS = {"densenet3d": ("init_channels", "growth_rate", "side_channels"), "unet3d": ("num_fmaps",)}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
DTYPES = ("fp32", "bf16")


def run_config(model, state, x_ref, layout, dtype, device, repeats, train=True) -> tuple[dict, torch.Tensor]:
    model.load_state_dict(state)
    model = model.to(memory_format=LAYOUTS[layout])
    x = x_ref.contiguous(memory_format=LAYOUTS[layout])
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    outputs = []

    def forward():
        with torch.inference_mode(), autocast:
            outputs.append(model(x).float())
            del outputs[:-1]

    def train_step():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model(x).float().sum()
        loss.backward()

    model.eval()
    forward()  # warm-up; its output is the one compared
    y = outputs.pop()
    fwd = timed(forward, repeats, device)
    outputs.clear()
    fwd_mem = peak_bytes(forward, device)
    outputs.clear()
    if not train:
        nan = float("nan")
        return {"forward_s": fwd, "train_s": nan, "fwd_mb": fwd_mem / 2**20, "train_mb": nan}, y
    model.train()
    train_step()  # warm-up
    step = timed(train_step, repeats, device)
    model.zero_grad(set_to_none=True)  # grads are allocated inside the measured step
    train_mem = peak_bytes(train_step, device)
    model.zero_grad(set_to_none=True)
    return {"forward_s": fwd, "train_s": step, "fwd_mb": fwd_mem / 2**20, "train_mb": train_mem / 2**20}, y


def scaled(options: dict, factor: float, keys: tuple[str, ...]) -> dict:
    """The options with every channel width in ``keys`` times ``factor`` (at least 3,
    so that three parallel streams or kernel-shape groups still get a channel each)."""
    return {k: max(3, round(v * factor)) if k in keys else v for k, v in options.items()}


def closest(count, candidates, target: int):
    """The candidate whose ``count(candidate)`` is closest to ``target`` (first on ties)."""
    return min(candidates, key=lambda c: abs(count(c) - target))


def equal_parameter_factor(build, options: dict, keys: tuple[str, ...], target: int) -> float:
    """The width factor (0.20 .. 4.00) whose network has the parameter count closest to
    ``target``: steps of 0.05, then of 0.01 around the best."""
    def count(factor):
        return count_parameters(build(scaled(options, factor, keys)))

    coarse = closest(count, [f / 100 for f in range(20, 401, 5)], target)
    return closest(count, [round(coarse + f / 100, 2) for f in range(-4, 5) if coarse + f / 100 > 0], target)


def cases(args):
    """(group, row label, conv, widths note, model factory, input shape) per row."""
    block, net = args.block_side, args.net_side
    backbones = {
        "densenet3d": ("densenet3d (MRI)", dict(BACKBONE_OPTIONS)),
        "unet3d": ("unet3d (same)", {"padding": "same", "num_fmaps": 12}),
    }
    for match in args.match if "block" in args.only else ():
        for conv in CONVS:
            if conv not in args.convs or (match == "params" and conv == "conv3d"):
                continue
            width = BLOCK_WIDTH
            if match == "params":
                target = count_parameters(make_conv("conv3d")(BLOCK_WIDTH, BLOCK_WIDTH, 3, padding=1))
                width = closest(lambda w, c=conv: count_parameters(make_conv(c)(w, w, 3, padding=1)),
                                range(4, 4 * BLOCK_WIDTH + 1), target)
            yield "block", f"block {width}->{width}", conv, "width" if match == "width" else f"params ({width} ch)", \
                (lambda c=conv, w=width: make_conv(c)(w, w, 3, padding=1)), (1, width, block, block, block)
    for group, (label, options) in backbones.items():
        if group not in args.only:
            continue
        for match in args.match:
            for conv in CONVS:
                if conv not in args.convs or (match == "params" and conv == "conv3d"):
                    continue

                def build(opts, c=conv, g=group):
                    return build_model(g, conv=c, **opts)

                opts, note = options, "width"
                if match == "params":
                    target = count_parameters(build(options, "conv3d"))
                    factor = equal_parameter_factor(build, options, WIDTH_KEYS[group], target)
                    opts, note = scaled(options, factor, WIDTH_KEYS[group]), f"params (x{factor:.2f} wide)"
                yield group, label, conv, note, (lambda b=build, o=opts: b(o)), (1, 1, net, net, net)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"backbones on 48^3 instead of the {PATCH_SIZE[0]}^3 training patch, 3 repeats "
                             "instead of 5 (about 2 minutes on 2 busy cores at --threads 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--only", nargs="+", choices=("block", "densenet3d", "unet3d"),
                        default=["block", "densenet3d", "unet3d"], help="which groups of rows to run")
    parser.add_argument("--convs", nargs="+", default=list(CONVS), help="subset of " + ", ".join(CONVS))
    parser.add_argument("--match", nargs="+", choices=MATCHES, default=list(MATCHES),
                        help="rows at equal width, and at equal parameter count to conv3d's")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--block-side", type=int, default=48, help="edge of the single block's input")
    parser.add_argument("--net-side", type=int, default=None,
                        help=f"edge of the backbones' input (e.g. {INFERENCE_WINDOW[0]}, the MRI inference window)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--forward-only", action="store_true", help="skip the training step (its columns show -)")
    args = parser.parse_args(argv)
    if args.net_side is None:
        args.net_side = 48 if args.quick else PATCH_SIZE[0]
    repeats = args.repeats or (3 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    console = Console(width=180)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    console.print(f"device {device} ({name}), nproc {os.cpu_count()}, torch {torch.__version__}, "
                  f"threads {torch.get_num_threads()}, repeats {repeats}, load average before: {load}")

    table = Table(title="conv3d vs PmSCn, CAKES, JFD: median time, peak memory above weights+input, agreement with fp32 contiguous",
                  caption=f"inputs: block 1xCx{args.block_side}^3 (C: its width), backbones 1x1x{args.net_side}^3 (densenet3d: "
                          "BACKBONE_OPTIONS of pipelines/mri/config.py; unet3d: default options, padding same).\n"
                          "'x' columns: ratio to the conv3d row of the same model, layout and dtype; 'params' rows "
                          "are scaled to conv3d's parameter count.")
    for column in ("model", "conv", "widths", "layout", "dtype", "params", "kMAC/vox", "fwd ms", "fwd+bwd ms", "fwd MB",
                   "train MB", "max rel diff", "fwd x", "fwd+bwd x", "train MB x"):
        table.add_column(column, no_wrap=True,
                         justify="left" if column in ("model", "conv", "widths", "layout", "dtype") else "right")
    base: dict[tuple, dict] = {}
    start = time.perf_counter()
    for group, what, conv, widths, make, shape in cases(args):
        if group not in args.only or conv not in args.convs:
            continue
        torch.manual_seed(0)
        model = make().to(device)
        state = copy.deepcopy(model.state_dict())
        params = count_parameters(model)
        # Forward multiply-accumulates per output voxel (torch's FlopCounterMode on a
        # 16^3 input: per voxel it does not depend on the input size).
        kmacs = macs_per_output_voxel(model.cpu(), (16, 16, 16), shape[1]) / 1000
        model.to(device)
        x = torch.randn(shape, device=device)
        reference = None
        for layout in args.layouts:
            for dtype in args.dtypes:
                r, y = run_config(model, state, x, layout, dtype, device, repeats, train=not args.forward_only)
                if reference is None:
                    reference = y  # the first configuration: fp32 contiguous with the defaults
                diff = float((y - reference).abs().max() / reference.abs().max().clamp_min(1e-30))
                key = (group, layout, dtype)
                if conv == "conv3d":
                    base[key] = r
                b = base.get(key)

                def ratio(k):
                    return "-" if b is None or r[k] != r[k] else f"{r[k] / b[k]:.2f}"

                def number(v, scale=1.0, digits=1):
                    return "-" if v != v else f"{scale * v:,.{digits}f}"

                table.add_row(what, conv, widths, layout, dtype, f"{params:,}", f"{kmacs:.1f}", number(r["forward_s"], 1000),
                              number(r["train_s"], 1000), number(r["fwd_mb"], digits=0),
                              number(r["train_mb"], digits=0), f"{diff:.1e}", ratio("forward_s"),
                              ratio("train_s"), ratio("train_mb"))
        table.add_section()
    console.print(table)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    console.print(f"total {time.perf_counter() - start:.0f} s; load average after: {load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
