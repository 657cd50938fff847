"""The same EM image in other dtypes (issue 14): the shipped EM model on a 50 x 96 x 96 crop
of FIB-25's tiny example as uint8, uint16 holding 0..255, uint16 holding 12 bits (x16) and
float32 holding 0..255, through prepare + run (serial), VI against its labels at the
run's threshold; then the same uint16 and float32 runs with the measured range removed
from the settings, i.e. the dtype scaling psc used before.

    python benchmarks/em_dtypes.py [WORK_DIR]     # default /tmp/psc-em-dtypes; needs ../shared/data
"""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np

from psc.models.shipped import ShippedWeights
from psc.pipelines.em.evaluate import evaluate_run
from psc.pipelines.em.run import prepare, run
from psc.pipelines.em.volumes import create_volume

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fib25" / "tiny_fib_example.h5"
CHUNKS, VOXEL = (32, 32, 32), (8, 8, 8)


def _volume(path: Path, name: str, data: np.ndarray) -> str:
    volume = create_volume(path, name, data.shape, data.dtype, CHUNKS, VOXEL)
    volume.write(volume.roi, data)
    return str(path / name)


def _segment(work: Path, tag: str, data: np.ndarray, dtype_scaling: bool = False) -> tuple[dict, dict, object]:
    out = work / f"{tag}_psc.zarr"
    settings = prepare(_volume(work / f"{tag}.zarr", "raw", data), out, ShippedWeights.EM_AFFINITY.value.path,
                       block_size=CHUNKS, force=True)
    if dtype_scaling:  # as a run prepared before the measurement: predict falls back to the dtype's range
        settings.raw_intensity = {}
        settings.save(out)
    return run(out, workers=0, progress=False), settings, out


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/psc-em-dtypes")
    work.mkdir(parents=True, exist_ok=True)
    with h5py.File(DATA, "r") as h5:
        raw, labels = h5["raw"][:, :96, :96], h5["labels"][:, :96, :96].astype(np.uint64)
    gt = _volume(work / "gt.zarr", "labels", labels)
    variants = {"uint8": raw, "uint16 holding 0..255": raw.astype(np.uint16),
                "uint16 holding 12 bits": raw.astype(np.uint16) * 16, "float32 holding 0..255": raw.astype(np.float32)}
    print("| raw | scaled by | segments | VI split | VI merge |\n|---|---|---|---|---|")
    for i, (name, data) in enumerate(variants.items()):
        result, settings, out = _segment(work, f"v{i}", data)
        scores = evaluate_run(str(out), gt, progress=False)[float(settings.threshold)]
        print(f"| {name} | {settings.raw_intensity['scale']:g} | {result['segments'][settings.threshold]} | "
              f"{scores['voi_split']:.3f} | {scores['voi_merge']:.3f} |", flush=True)
    for i, name in enumerate(("uint16 holding 0..255", "float32 holding 0..255")):
        result, settings, out = _segment(work, f"before{i}", variants[name], dtype_scaling=True)
        scores = evaluate_run(str(out), gt, progress=False)[float(settings.threshold)]
        print(f"| {name}, dtype scaling (before) | dtype | {result['segments'][settings.threshold]} | "
              f"{scores['voi_split']:.3f} | {scores['voi_merge']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
