"""The EM model comparison of docs/results-em.md: parameters, VI split/merge per threshold
on the held-out region of the training crop (the full blockwise pipeline, not the
training-time shortcut) and on the second FIB-25 crop that no model saw, against the
naive baseline.

    python benchmarks/em_results.py --raw runs/data/fib25.zarr --other runs/data/fib25-tiny.zarr \\
        models/pretrained/em_unet3d_p2sc2.pt benchmarks/weights/em_unet3d_conv3d.pt
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


from psc.models.weights import ModelCard, card_path
from psc.pipelines.em.baseline import baseline_segmentation
from psc.pipelines.em.evaluate import evaluate_run
from psc.pipelines.em.metrics import evaluate
from psc.pipelines.em.run import prepare, run
from psc.pipelines.em.volumes import create_volume, open_volume

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def held_out(container: str, folder: Path, x_from: int | None) -> tuple[str, str]:
    """raw and labels of the region right of ``x_from`` (the training hold-out) as zarr."""
    raw, labels = open_volume(container, "raw"), open_volume(container, "labels")
    if x_from is None:
        return f"{container}/raw", f"{container}/labels"
    out = folder / f"{Path(container).stem}-heldout.zarr"
    for name, volume in (("raw", raw), ("labels", labels)):
        data = volume.array[:, :, x_from:]
        target = create_volume(out, name, data.shape, data.dtype, (64, 64, 64), volume.voxel_size)
        target.write(target.roi, data)
    return f"{out}/raw", f"{out}/labels"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", nargs="+")
    parser.add_argument("--raw", required=True, help="training container (raw, labels); its x >= split is held out")
    parser.add_argument("--other", help="a second container (raw, labels) no model was trained on")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        split = int(json.loads(card_path(args.weights[0]).read_text())["training"]["val_roi"].split(",")[2].split(":")[0].strip(" [("))
        regions = {"held-out region": held_out(args.raw, folder, split)}
        if args.other:
            regions["other crop"] = held_out(args.other, folder, None)
        for region, (raw, labels) in regions.items():
            data, gt = open_volume(raw).array[:], open_volume(labels).array[:]
            rows.append((region, "baseline (smoothed raw, watershed)", "-", {None: evaluate(baseline_segmentation(data), gt)}, 0.0))
            for weights in args.weights:
                card = ModelCard.from_json(card_path(weights))
                out = folder / f"{Path(weights).stem}-{region.replace(' ', '_')}.zarr"
                started = time.perf_counter()
                prepare(raw, out, weights, thresholds=THRESHOLDS, workers=args.workers, block_size=(48, 48, 48))
                run(out, workers=args.workers, progress=False)
                seconds = time.perf_counter() - started
                rows.append((region, f"unet3d {card.conv}", f"{card.parameters:,}", evaluate_run(str(out), labels, progress=False), seconds))
    print("| data | model | parameters | best threshold | VI split | VI merge | VI | adapted Rand error | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for region, model, params, results, seconds in rows:
        best = min(results, key=lambda t: results[t]["voi"])
        r = results[best]
        print(f"| {region} | {model} | {params} | {'-' if best is None else f'{best:g}'} | {r['voi_split']:.3f} | "
              f"{r['voi_merge']:.3f} | {r['voi']:.3f} | {r['adapted_rand_error']:.3f} | {seconds:.0f} |")
    print()
    print("VI split / VI merge per threshold:")
    print()
    print("| data | model | " + " | ".join(f"t={t:g}" for t in THRESHOLDS) + " |")
    print("|---|---|" + "---|" * len(THRESHOLDS))
    for region, model, params, results, seconds in rows:
        if None in results:
            continue
        cells = [f"{results[t]['voi_split']:.2f} / {results[t]['voi_merge']:.2f}" for t in THRESHOLDS]
        print(f"| {region} | {model} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
