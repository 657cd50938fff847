"""EM pipeline throughput and memory: voxels per second per stage and peak memory, for 1
and 2 workers, on synthetic volumes of two sizes (blocks matter from 256^3 on).

Each (size, workers) case runs in a fresh process, stage by stage (``run(stages=...)``),
so the peak resident memory of the scheduler process and of its largest worker process
(``getrusage``: RUSAGE_SELF and RUSAGE_CHILDREN) belong to that case alone. With memory
bounded by the block size, the worker peak stays flat when the volume grows.

    python benchmarks/em.py                       # 256^3 and 320^3, 1 and 2 workers
    python benchmarks/em.py --sizes 128 --workers 1   # a quick look
    python benchmarks/em.py --precision fp32 bf16     # the network's precision, side by side
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def one_case(raw: str, out: str, weights: str, workers: int, block: int, precision: str) -> dict:
    from psc.pipelines.em.run import STAGE_NAMES, prepare, run

    prepare(raw, out, weights, block_size=(block,) * 3, workers=workers, precision=precision)
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


def make_raw(folder: Path, size: int) -> str:
    from psc.pipelines.em.synthetic import make_em_volume
    from psc.pipelines.em.volumes import create_volume

    raw, _ = make_em_volume((size,) * 3, cell_size=24, seed=size)
    volume = create_volume(folder / f"raw{size}.zarr", "raw", raw.shape, "uint8", (64, 64, 64), (8, 8, 8))
    volume.write(volume.roi, raw)
    return str(folder / f"raw{size}.zarr" / "raw")


def main() -> None:
    from psc.models.shipped import ShippedWeights
    from psc.pipelines.em.run import STAGE_NAMES

    from machine import machine_line  # benchmarks/, first on sys.path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 320])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--weights", default=str(ShippedWeights.EM_AFFINITY.value.path))
    parser.add_argument("--precision", nargs="+", default=["fp32"], help="fp32, bf16, fp16 or auto, each a row")
    parser.add_argument("--one", nargs=4, metavar=("RAW", "OUT", "WORKERS", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--make", nargs=2, metavar=("FOLDER", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:
        print(make_raw(Path(args.make[0]), int(args.make[1])))
        return
    if args.one:
        raw, out, workers, precision = args.one
        print(json.dumps(one_case(raw, out, args.weights, int(workers), args.block, precision)))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            # made in a child process: Linux keeps a process's peak RSS across fork + exec,
            # so a parent holding the volume would inflate every case's scheduler peak
            raw = subprocess.run([sys.executable, __file__, "--make", tmp, str(size)], capture_output=True,
                                 text=True, check=True).stdout.strip().splitlines()[-1]
            for workers in args.workers:
                for precision in args.precision:
                    out = Path(tmp) / f"out{size}-{workers}-{precision}.zarr"
                    result = subprocess.run([sys.executable, __file__, "--one", raw, str(out), str(workers),
                                             precision, "--block", str(args.block), "--weights", args.weights],
                                            capture_output=True, text=True, check=True)
                    case = json.loads(result.stdout.strip().splitlines()[-1])
                    rows.append((size, workers, precision, case))
                    print(f"done {size}^3 with {workers} worker(s), {precision}", file=sys.stderr, flush=True)

    print(f"{machine_line()}; block {args.block}^3; weights {Path(args.weights).name}")
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


if __name__ == "__main__":
    main()
