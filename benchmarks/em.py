"""EM pipeline throughput and memory: voxels per second per stage and peak memory, for 1
and 2 workers, on synthetic volumes of two sizes (blocks matter from 256^3 on); and, with
``--blocks``, the predict stage against the network alone for several block sizes.

Each (size, workers) case runs in a fresh process, stage by stage (``run(stages=...)``),
so the peak resident memory of the scheduler process and of its largest worker process
(``getrusage``: RUSAGE_SELF and RUSAGE_CHILDREN) belong to that case alone. With memory
bounded by the block size, the worker peak stays flat when the volume grows.

``--blocks`` prints a second table, one row per block size, each measured in fresh
processes: the predict stage alone (``run(stages=("predict",))``, one worker) on a
synthetic volume that every block size tiles exactly, in output voxels per second of
wall time (worker start and model load included), beside the network alone on one
block's input (the block grown by the network's context, a warm forward pass, the
median of ``--repeats``, in output voxels per second), their ratio, the read
amplification (input voxels per output voxel), the worker's start-up (imports and
building the predictor), and the peak resident memory (``ru_maxrss``) of the predict
stage's worker process and of the network-alone process.

    python benchmarks/em.py                       # 256^3 and 320^3, 1 and 2 workers
    python benchmarks/em.py --sizes 128 --workers 1   # a quick look
    python benchmarks/em.py --precision fp32 bf16     # the network's precision, side by side
    python benchmarks/em.py --sizes --blocks 64 96 128 64x128x128 --threads 1   # block sizes only
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def block_shape(text: str) -> tuple[int, int, int]:
    """``64`` -> (64, 64, 64); ``64x128x128`` -> (64, 128, 128) (z, y, x)."""
    sides = tuple(int(s) for s in text.lower().split("x"))
    if len(sides) == 1:
        sides *= 3
    if len(sides) != 3 or any(s <= 0 for s in sides):
        raise argparse.ArgumentTypeError(f"{text!r}: a block is N or ZxYxX")
    return sides


def block_name(shape) -> str:
    return f"{shape[0]}^3" if len(set(shape)) == 1 else "x".join(map(str, shape))


def _set_threads(out: str, threads: int | None) -> None:
    """Override the torch threads per worker that ``prepare`` chose (cores / workers)."""
    if threads:
        from psc.pipelines.em.layout import RunSettings

        settings = RunSettings.load(out)
        settings.threads_per_worker = threads
        settings.save(out)


def one_case(raw: str, out: str, weights: str, workers: int, block, precision: str,
             threads: int | None = None) -> dict:
    from psc.pipelines.em.run import STAGE_NAMES, prepare, run

    prepare(raw, out, weights, block_size=tuple(block), workers=workers, precision=precision)
    _set_threads(out, threads)
    seconds = {}
    for stage in STAGE_NAMES:
        started = time.perf_counter()
        run(out, workers=workers, stages=(stage,), progress=False)
        seconds[stage] = time.perf_counter() - started
    return {
        "seconds": seconds,
        "scheduler_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def predict_case(raw: str, out: str, weights: str, block, precision: str, threads: int | None) -> dict:
    """The predict stage alone, one worker process (its peak RSS: RUSAGE_CHILDREN)."""
    from psc.pipelines.em.run import prepare, run

    prepare(raw, out, weights, block_size=tuple(block), workers=1, precision=precision)
    _set_threads(out, threads)
    started = time.perf_counter()
    run(out, workers=1, stages=("predict",), progress=False)
    return {"seconds": time.perf_counter() - started,
            "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def network_case(weights: str, block, precision: str, threads: int | None, repeats: int) -> dict:
    """The network alone on one block's input, in this (fresh) process, set up as a
    predict worker sets itself up (freed memory kept, the predictor built once)."""
    started = time.perf_counter()
    import numpy as np
    import torch

    from psc.pipelines.allocator import keep_freed_memory
    from psc.pipelines.em.predict import AffinityPredictor

    keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    predictor = AffinityPredictor(weights, precision=precision)
    setup = time.perf_counter() - started
    shape = tuple(int(b) + 2 * int(c) for b, c in zip(block, predictor.context))
    x = torch.from_numpy(np.random.default_rng(0).random(shape, dtype=np.float32))[None, None]
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first pass warms up (oneDNN primitives, pages)
            started = time.perf_counter()
            y = predictor.network(x).float()
            times.append(time.perf_counter() - started)
    if tuple(y.shape[2:]) != tuple(block):
        raise ValueError(f"the network made {tuple(y.shape[2:])} from {shape}, not the block {tuple(block)}")
    return {"seconds": float(np.median(times[1:])), "setup_s": setup, "context": list(predictor.context),
            "threads": torch.get_num_threads(),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def make_raw(folder: Path, shape) -> str:
    from psc.pipelines.em.synthetic import make_em_volume
    from psc.pipelines.em.volumes import create_volume

    shape = tuple(shape)
    name = "raw" + "x".join(map(str, shape)) + ".zarr"
    raw, _ = make_em_volume(shape, cell_size=24, seed=shape[0])
    volume = create_volume(folder / name, "raw", raw.shape, "uint8", (64, 64, 64), (8, 8, 8))
    volume.write(volume.roi, raw)
    return str(folder / name / "raw")


def _child(*args: str) -> dict | str:
    # every case in a fresh process: Linux keeps a process's peak RSS across fork + exec,
    # so a parent holding a volume or a network would inflate every case's peak
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-4000:]}")
    last = result.stdout.strip().splitlines()[-1]
    return json.loads(last) if last.startswith("{") else last


def tiled_volume(blocks, at_least: int = 256) -> tuple[int, int, int]:
    """The smallest volume, at least ``at_least`` per side, that every block tiles."""
    shape = []
    for axis in range(3):
        side = math.lcm(*(b[axis] for b in blocks))
        shape.append(side * -(-at_least // side))
    return tuple(shape)


def block_table(args, tmp: str) -> list[str]:
    blocks = args.blocks
    volume = tuple(args.block_volume) if args.block_volume else tiled_volume(blocks)
    raw = _child("--make", tmp, "x".join(map(str, volume)))
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    rows = []
    for block in blocks:
        spec = "x".join(map(str, block))
        for precision in args.precision:
            out = str(Path(tmp) / f"predict-{spec}-{precision}.zarr")
            stage = _child("--predict-one", raw, out, spec, precision, "--weights", args.weights, *threads)
            network = _child("--network-one", spec, precision, "--weights", args.weights,
                             "--repeats", str(args.repeats), *threads)
            rows.append((block, precision, stage, network))
            print(f"done predict {block_name(block)}, {precision}", file=sys.stderr, flush=True)
    voxels = math.prod(volume)
    lines = [f"predict stage by block size: volume {'x'.join(map(str, volume))} (synthetic), one worker, "
             f"torch threads {rows[0][3]['threads']}; network alone: one block's input, median of "
             f"{args.repeats} warm passes; peak MB: ru_maxrss of the worker process / of the network-alone process",
             "| block | precision | read amplification | predict stage Mvox/s | network alone Mvox/s | stage / network "
             "| worker start s | worker peak MB | network peak MB |",
             "|" + "---|" * 9]
    for block, precision, stage, network in rows:
        context = network["context"]
        amplification = math.prod(b + 2 * c for b, c in zip(block, context)) / math.prod(block)
        stage_speed = voxels / stage["seconds"] / 1e6
        network_speed = math.prod(block) / network["seconds"] / 1e6
        lines.append(f"| {block_name(block)} | {precision} | {amplification:.2f} | {stage_speed:.3f} | "
                     f"{network_speed:.3f} | {stage_speed / network_speed:.2f} | {network['setup_s']:.1f} | "
                     f"{stage['worker_peak_mb']:.0f} | {network['peak_mb']:.0f} |")
    return lines


def main() -> None:
    from psc.models.shipped import ShippedWeights
    from psc.pipelines.em.layout import RunSettings
    from psc.pipelines.em.run import STAGE_NAMES

    from machine import machine_line  # benchmarks/, first on sys.path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 320],
                        help="volumes of the per-stage table (none: no per-stage table)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--block", type=block_shape, default=tuple(RunSettings.block_size),
                        help="block of the per-stage table, N or ZxYxX (default: the run's default)")
    parser.add_argument("--blocks", type=block_shape, nargs="*", default=[],
                        help="block sizes of the predict-stage table, N or ZxYxX each")
    parser.add_argument("--block-volume", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="volume of the predict-stage table (default: the smallest, at least 256 a side, "
                             "that every block tiles)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of the network alone")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    parser.add_argument("--weights", default=str(ShippedWeights.EM_AFFINITY.value.path))
    parser.add_argument("--precision", nargs="+", default=["fp32"], help="fp32, bf16, fp16 or auto, each a row")
    parser.add_argument("--one", nargs=4, metavar=("RAW", "OUT", "WORKERS", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--predict-one", nargs=4, metavar=("RAW", "OUT", "BLOCK", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--network-one", nargs=2, metavar=("BLOCK", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, metavar=("FOLDER", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        print(make_raw(Path(args.make[0]), block_shape(args.make[1])))
        return
    if args.one:
        raw, out, workers, precision = args.one
        print(json.dumps(one_case(raw, out, args.weights, int(workers), args.block, precision, args.threads)))
        return
    if args.predict_one:
        raw, out, block, precision = args.predict_one
        print(json.dumps(predict_case(raw, out, args.weights, block_shape(block), precision, args.threads)))
        return
    if args.network_one:
        block, precision = args.network_one
        print(json.dumps(network_case(args.weights, block_shape(block), precision, args.threads, args.repeats)))
        return

    rows = []
    block = "x".join(map(str, args.block))
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            raw = _child("--make", tmp, str(size))
            for workers in args.workers:
                for precision in args.precision:
                    out = Path(tmp) / f"out{size}-{workers}-{precision}.zarr"
                    case = _child("--one", raw, str(out), str(workers), precision, "--block", block,
                                  "--weights", args.weights, *threads)
                    rows.append((size, workers, precision, case))
                    print(f"done {size}^3 with {workers} worker(s), {precision}", file=sys.stderr, flush=True)
        predict_lines = block_table(args, tmp) if args.blocks else []

    print(f"{machine_line()}; block {block_name(args.block)}; weights {Path(args.weights).name}"
          + (f"; torch threads per worker {args.threads}" if args.threads else ""))
    if rows:
        header = ["volume", "workers", "precision"] + [f"{s} Mvox/s" for s in STAGE_NAMES] + [
            "total s", "worker peak MB", "scheduler peak MB"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for size, workers, precision, case in rows:
            voxels = size**3
            speeds = [f"{voxels / case['seconds'][s] / 1e6:.2f}" for s in STAGE_NAMES]
            total = sum(case["seconds"].values())
            print(f"| {size}^3 | {workers} | {precision} | " + " | ".join(speeds)
                  + f" | {total:.0f} | {case['worker_peak_mb']:.0f} | {case['scheduler_peak_mb']:.0f} |")
    if predict_lines:
        if rows:
            print()
        print("\n".join(predict_lines))


if __name__ == "__main__":
    main()
