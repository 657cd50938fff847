"""Issue 15's generalisation table (docs/results-em.md): EM models x held-out regions of
every volume, with each model's training set beside it, so leave-one-volume-out rows
(a model tested on a sample it never saw) and same-sample rows read side by side.

For each model and region: affinities predicted in memory (the volume's intensities
measured as a run measures them, context from the rest of the volume as in a blockwise
run: tests assert blockwise = in-memory), then

- waterz with the pipeline's scoring (mean affinity) at thresholds 0.2-0.8: VI split /
  merge at the card's default threshold and at the region's best;
- the same fragments with waterz's quantile scoring (median, 75th percentile);
- mutex watershed (``mwatershed``, Wolf et al. 2018; not a psc dependency: measured and
  dropped, docs/results-em.md) for models with long-range affinities when it is
  installed, over a grid of nearest-neighbour and long-range biases;

and the naive baseline (smoothed raw, seeded watershed) tuned on each region itself, so
it is flattered. Every model's threshold comes from its card; ``--pick-threshold``
prints the threshold with the lowest mean VI over the leave-one-volume-out rows, the
rule for the shipped model's default.

    python benchmarks/em_transfer.py --threads 2 \\
        fib25=models/pretrained/em_unet3d_p2sc2.pt lovo-fib25=runs/weights/em_unet3d_lovo-fib25.pt ...

Model names ``lovo-<sample>`` or ``lovo-<sample>-<variant>`` (an ablation) mark
leave-one-volume-out models trained on that sample only (fib25: both FIB-25 crops;
neuroproof).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from psc.models.weights import ModelCard, card_path
from psc.pipelines.em.affinities import long_range_offsets
from psc.pipelines.em.agglomerate import QUANTILE_SCORING
from psc.pipelines.em.baseline import baseline_segmentation
from psc.pipelines.em.intensity import measure
from psc.pipelines.em.metrics import evaluate
from psc.pipelines.em.options import threshold_for
from psc.pipelines.em.postprocess import segment_affinities
from psc.pipelines.em.predict import AffinityPredictor
from psc.pipelines.em.train import VAL_THRESHOLDS, held_out_split
from psc.pipelines.em.volumes import open_volume

# region name -> (container, sample): the sample a model must not have seen to be a
# leave-one-volume-out row
REGIONS = {"fib25": ("fib25.zarr", "fib25"), "fib25-tiny": ("fib25-tiny.zarr", "fib25"),
           "neuroproof": ("neuroproof.zarr", "neuroproof")}
VARIANT_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # quantile scores run lower
ADJACENT_BIASES = (0.0, 0.1, 0.2, 0.3)  # positive: nearest-neighbour edges attract more readily
LR_BIASES = (-0.4, -0.2, 0.0, 0.2)  # negative: long-range edges repel more readily
BASELINE_GRID = {"sigma": (0.5, 1.0, 2.0), "seed_quantile": (0.5, 0.7, 0.9), "min_distance": (8, 16, 24, 32)}


def mutex_segmentations(affinities: np.ndarray, offsets: list, adjacent_biases=ADJACENT_BIASES,
                        long_range_biases=LR_BIASES) -> dict[str, np.ndarray]:
    """Mutex watershed of all channels, weight = affinity - 0.5 + a bias per edge kind,
    over a grid of the nearest-neighbour bias and the long-range one (keys
    ``"adjacent +0.1, long-range -0.2"``). Both directions are swept: an over-split
    result asks for a positive adjacent bias, an over-merged one for a negative
    long-range bias."""
    import mwatershed

    unbiased = affinities.astype(np.float64) - 0.5
    out = {}
    for adjacent, long_range in itertools.product(adjacent_biases, long_range_biases):
        weights = unbiased.copy()
        weights[:3] += adjacent
        weights[3:] += long_range
        key = f"adjacent {adjacent:+g}, long-range {long_range:+g}"
        out[key] = mwatershed.agglom(weights, [list(o) for o in offsets]).astype(np.uint64)
    return out


def offsets_of(card: ModelCard) -> tuple[tuple[int, int, int], ...]:
    """The channel offsets of a model trained with long-range targets (its card's
    ``training.long_range``, in ``affinities.long_range_offsets`` order)."""
    return long_range_offsets(tuple(int(d) for d in card.training.get("long_range", ())))


def scores(segmentations: dict, gt: np.ndarray) -> dict:
    return {(k if isinstance(k, str) else float(k)): evaluate(s, gt) for k, s in segmentations.items()}


def summary(per_threshold: dict, default: float | None) -> dict:
    best = min(per_threshold, key=lambda t: per_threshold[t]["voi"])
    result = {"best": best, "best_voi": per_threshold[best]["voi"], "best_split": per_threshold[best]["voi_split"],
              "best_merge": per_threshold[best]["voi_merge"]}
    if default is not None:
        d = per_threshold[min(per_threshold, key=lambda t: abs(t - default))]
        result.update(default=default, default_voi=d["voi"], default_split=d["voi_split"],
                      default_merge=d["voi_merge"])
    return result


def tuned_baseline(raw: np.ndarray, gt: np.ndarray) -> dict:
    best = None
    for sigma, quantile, distance in itertools.product(*BASELINE_GRID.values()):
        result = evaluate(baseline_segmentation(raw, sigma, quantile, distance), gt)
        if best is None or result["voi"] < best["voi"]:
            best = {**result, "params": [sigma, quantile, distance]}
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="NAME=WEIGHTS")
    parser.add_argument("--data", default="runs/data", help="folder of fib25.zarr, fib25-tiny.zarr, neuroproof.zarr")
    parser.add_argument("--regions", nargs="+", default=list(REGIONS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default="", help="write every number here")
    parser.add_argument("--no-variants", action="store_true", help="only the pipeline's scoring (faster)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=list(VAL_THRESHOLDS),
                        help="waterz thresholds of the pipeline's scoring (default: training's validation grid)")
    parser.add_argument("--plot", default="", help="draw the table here (PNG): VI split + merge per model and region")
    parser.add_argument("--include", nargs="*", default=[],
                        help="--json files of earlier runs (same regions): their models join the tables")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"baseline": {}, "models": {}}
    data = Path(args.data)
    regions = {}
    for name in args.regions:
        container, _ = REGIONS[name]
        raw, labels = open_volume(str(data / container), "raw"), open_volume(str(data / container), "labels")
        _, val_roi = held_out_split(tuple(raw.shape), 0.25)
        intensity, _ = measure(raw, name)
        regions[name] = (raw, labels, val_roi, intensity, labels.read(val_roi))
        started = time.time()
        results["baseline"][name] = tuned_baseline(raw.read(val_roi), regions[name][4])
        print(f"baseline {name}: VI {results['baseline'][name]['voi']:.3f} ({time.time() - started:.0f} s)", flush=True)
    for spec in args.models:
        model_name, weights = spec.split("=", 1)
        card = ModelCard.from_json(card_path(weights))
        default = threshold_for(card)
        results["models"][model_name] = {"weights": weights, "default_threshold": default, "regions": {}}
        for name, (raw, labels, val_roi, intensity, gt) in regions.items():
            started = time.time()
            predictor = AffinityPredictor(weights, intensity=intensity)
            affinities = predictor.predict(raw, val_roi, all_channels=True)
            nearest = np.ascontiguousarray(affinities[:3])
            # the card's own threshold always scored, as prepare() stores it beside the grid
            thresholds = tuple(sorted({float(t) for t in args.thresholds} | {float(default)}))
            mean_scores = scores(segment_affinities(nearest, thresholds), gt)
            entry = {"mean": summary(mean_scores, default),
                     "per_threshold": {str(t): v for t, v in mean_scores.items()}}
            if not args.no_variants:
                for q in (50, 75):
                    scoring = QUANTILE_SCORING.format(q=q)
                    entry[f"quantile{q}"] = summary(scores(segment_affinities(nearest, VARIANT_THRESHOLDS,
                                                                              scoring=scoring), gt), None)
                if card.out_channels > 3 and importlib.util.find_spec("mwatershed"):  # pip install mwatershed
                    offsets = offsets_of(card)  # shape-descriptor channels (if any) come after these
                    entry["mutex"] = summary(scores(mutex_segmentations(affinities[:len(offsets)], offsets), gt), None)
            entry["seconds"] = time.time() - started
            results["models"][model_name]["regions"][name] = entry
            m = entry["mean"]
            print(f"{model_name} on {name}: default t={default} VI {m['default_split']:.3f}/{m['default_merge']:.3f} "
                  f"= {m['default_voi']:.3f}; best t={m['best']} {m['best_voi']:.3f}"
                  + "".join(f"; {k} {v['best_voi']:.3f} (at {v['best']})" for k, v in entry.items()
                            if k not in ("mean", "seconds", "per_threshold") and v)
                  + f" ({entry['seconds']:.0f} s)", flush=True)
    for earlier in args.include:
        for name, model in json.loads(Path(earlier).read_text())["models"].items():
            results["models"].setdefault(name, model)
    print_tables(results)
    if args.plot:
        plot_tables(results, Path(args.plot))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=float))


def lovo_sample(model_name: str) -> str | None:
    """The one sample a ``lovo-<sample>`` or ``lovo-<sample>-<variant>`` model was trained on."""
    samples = {sample for _, sample in REGIONS.values()}
    return next((s for s in samples if model_name in (f"lovo-{s}",) or model_name.startswith(f"lovo-{s}-")), None)


def unseen(model_name: str, region: str) -> bool:
    """Whether ``region`` is of a sample the leave-one-volume-out model never saw."""
    sample = lovo_sample(model_name)
    return sample is not None and sample != REGIONS[region][1]


def print_tables(results: dict) -> None:
    print("\n| test region | model | trained on | default t | VI split | VI merge | VI | best t | VI at best "
          "| quantile 50 / 75 (best) | mutex (best) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for region in next(iter(results["models"].values()))["regions"]:
        b = results["baseline"].get(region)
        if b:
            print(f"| {region} | naive watershed (tuned on this region) | - | - | {b['voi_split']:.3f} | "
                  f"{b['voi_merge']:.3f} | {b['voi']:.3f} | - | - | - | - |")
        for name, model in results["models"].items():
            e = model["regions"][region]
            m = e["mean"]
            trained = lovo_sample(name) or "see card"
            tag = " (unseen sample)" if unseen(name, region) else ""
            q = " / ".join(f"{e[k]['best_voi']:.3f}" for k in ("quantile50", "quantile75") if e.get(k))
            mx = f"{e['mutex']['best_voi']:.3f} ({e['mutex']['best']})" if e.get("mutex") else "-"
            print(f"| {region}{tag} | {name} | {trained} | {m['default']:g} | {m['default_split']:.3f} | "
                  f"{m['default_merge']:.3f} | {m['default_voi']:.3f} | {m['best']:g} | {m['best_voi']:.3f} | "
                  f"{q or '-'} | {mx} |")
    lovo = [(name, region) for name, model in results["models"].items() for region in model["regions"]
            if unseen(name, region)]
    if lovo:
        print("\nthreshold with the lowest mean VI over the leave-one-volume-out rows (waterz, mean scoring):")
        per_t = {}
        for name, region in lovo:
            for t, v in results["models"][name]["regions"][region]["per_threshold"].items():
                per_t.setdefault(float(t), []).append(v["voi"])
        for t in sorted(per_t):
            print(f"  t={t:g}: mean VI {np.mean(per_t[t]):.3f}")


def plot_tables(results: dict, path: Path) -> None:
    """One panel per test region: each model's VI at its card's threshold as split (below)
    + merge (above), hatched where the region is a sample the model never saw, a dot at
    its VI at the region's best threshold, and the tuned naive watershed as a dashed line."""
    from matplotlib.figure import Figure

    regions = list(next(iter(results["models"].values()))["regions"])
    names = list(results["models"])
    figure = Figure(figsize=(4.2 * len(regions), 4.2), layout="constrained")
    axes = figure.subplots(1, len(regions), sharey=True, squeeze=False)[0]
    for ax, region in zip(axes, regions):
        for i, name in enumerate(names):
            m = results["models"][name]["regions"][region]["mean"]
            hatch = "//" if unseen(name, region) else None
            ax.bar(i, m["default_split"], color="tab:blue", hatch=hatch, edgecolor="white",
                   label="VI split" if i == 0 else None)
            ax.bar(i, m["default_merge"], bottom=m["default_split"], color="tab:orange", hatch=hatch,
                   edgecolor="white", label="VI merge" if i == 0 else None)
            ax.plot(i, m["best_voi"], "ko", markersize=4, label="VI at the best threshold" if i == 0 else None)
        baseline = results["baseline"].get(region)
        if baseline:
            ax.axhline(baseline["voi"], color="grey", linestyle="--", label="naive watershed (tuned here)")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"held-out region of {region}", fontsize=10)
    axes[0].set_ylabel("VI at the card's threshold (bits)")
    axes[0].legend(fontsize=7, loc="upper left")
    figure.suptitle("EM models on held-out regions (hatched: a sample the model never saw)", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
