"""Training the affinity U-Net from a raw volume and its instance labels.

Random crops (output ``out_size``; input grown by the network's context, mirrored at the
volume border like inference), augmented by flips, axis transposes (FIB-SEM is
isotropic) and intensity scale/shift/gamma *before* the affinity targets are computed,
so targets always match the augmented labels. Loss: binary cross-entropy weighted so
that boundary and non-boundary edges of each channel count equally, label-0 interior
masked. A held-out region (the last ``val_fraction`` of x) is segmented with the full
post-processing every ``val_every`` iterations and scored by VI; the best sum of VI over
the thresholds selects the checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from funlib.geometry import Roi
from tqdm import tqdm

from psc.models import build_model
from psc.models.weights import ModelCard, save_weights

from .affinities import affinities_from_labels, balance_weights
from .metrics import evaluate
from .postprocess import segment_affinities
from .predict import AffinityPredictor, normalise_raw
from .volumes import Volume, open_volume, read_clamped

BACKBONE_OPTIONS = {"num_fmaps": 12, "fmap_inc_factor": 3, "downsample_factors": [[2, 2, 2], [2, 2, 2]]}
VAL_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


@dataclass
class EMTrainConfig:
    raw: str
    labels: str
    out: str
    conv: str = "p2sc2"
    options: dict = field(default_factory=lambda: dict(BACKBONE_OPTIONS))
    out_size: int = 24
    batch: int = 2
    iterations: int = 2000
    val_every: int = 200
    val_fraction: float = 0.25
    lr: float = 5e-4
    seed: int = 0
    threads: int = 0
    export: str = ""
    data_source: str = ""
    data_terms: str = ""


class _Predictor(AffinityPredictor):
    """The training model seen through the inference code (same context, same padding)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.device, self.dtype = model, torch.device("cpu"), torch.float32
        factors = np.prod(np.array(model.downsample_factors), axis=0)
        from funlib.geometry import Coordinate

        self.grid = Coordinate(int(f) for f in factors)
        self.context = Coordinate(self._context())


def _augment(raw: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(3)
    raw, labels = raw.transpose(order), labels.transpose(order)
    for axis in range(3):
        if rng.random() < 0.5:
            raw, labels = np.flip(raw, axis), np.flip(labels, axis)
    raw = raw * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1)
    raw = np.clip(raw, 0, 1) ** rng.uniform(0.8, 1.25)
    return np.ascontiguousarray(raw, dtype=np.float32), np.ascontiguousarray(labels)


class Sampler:
    """Random training crops from the part of the volume left of the validation region."""

    def __init__(self, raw: Volume, labels: Volume, train_roi: Roi, out_size: int, context: int, seed: int):
        self.raw, self.labels, self.train_roi = raw, labels, train_roi
        self.out, self.context = out_size, context
        self.rng = np.random.default_rng(seed)

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # the crop is cubic so transposes keep shapes; +1 voxel so edges to the
        # neighbour before the first slice have a label on both sides
        size = self.out + 1
        begin = [self.rng.integers(lo, max(lo, hi - size) + 1) for lo, hi in zip(self.train_roi.begin, self.train_roi.end)]
        label_roi = Roi(begin, (size,) * 3)
        input_roi = label_roi.grow((self.context,) * 3, (self.context,) * 3)
        raw = normalise_raw(read_clamped(self.raw, input_roi))
        labels = read_clamped(self.labels, label_roi)
        # voxels mirrored in from outside the training region have no trustworthy label
        inside = np.zeros(labels.shape, bool)
        inside_roi = label_roi.intersect(self.train_roi) - label_roi.offset
        inside[inside_roi.to_slices()] = True
        big_labels = np.zeros(raw.shape, labels.dtype)
        c = self.context
        big_labels[c:c + size, c:c + size, c:c + size] = np.where(inside, labels.astype(np.int64) + 1, 0)
        raw, big_labels = _augment(raw, big_labels, self.rng)
        labels = big_labels[c:c + size, c:c + size, c:c + size].astype(np.int64)
        known = labels > 0
        labels = labels - 1  # back to the data's labels; -1 = unknown
        target, mask = affinities_from_labels(np.where(known, labels, 0), background=0)
        for axis in range(3):  # an edge is trusted only if both its voxels are known
            here = [slice(None)] * 3
            back = [slice(None)] * 3
            here[axis], back[axis] = slice(1, None), slice(None, -1)
            both = np.zeros_like(known)
            both[tuple(here)] = known[tuple(here)] & known[tuple(back)]
            mask[axis] *= both
        crop = (slice(None), slice(1, None), slice(1, None), slice(1, None))
        target, mask = target[crop], mask[crop]
        return raw[1:, 1:, 1:], target, mask, balance_weights(target, mask)


def validate(model: torch.nn.Module, raw: Volume, labels: Volume, val_roi: Roi) -> dict:
    model.eval()
    predictor = _Predictor(model)
    affinities = predictor.predict(raw, val_roi)
    model.train()
    gt = labels.read(val_roi)
    results = {}
    for threshold, segmentation in segment_affinities(affinities, VAL_THRESHOLDS).items():
        results[threshold] = evaluate(segmentation, gt)
    best = min(results, key=lambda t: results[t]["voi"])
    return {"per_threshold": results, "best_threshold": best, "voi": results[best]["voi"]}


def _lr(step: int, cfg: EMTrainConfig) -> float:
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, cfg.iterations))))


def train(cfg: EMTrainConfig, resume: bool = False) -> Path:
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    raw, labels = open_volume(cfg.raw), open_volume(cfg.labels)
    if raw.shape != labels.shape:
        from psc.utils.errors import InputError

        raise InputError(f"raw {raw.shape} and labels {labels.shape} differ in shape")
    split = int(round(raw.shape[2] * (1 - cfg.val_fraction))) // 4 * 4  # on the pooling grid
    train_roi = Roi((0, 0, 0), (raw.shape[0], raw.shape[1], split))
    val_roi = Roi((0, 0, split), (raw.shape[0], raw.shape[1], raw.shape[2] - split))
    model = build_model("unet3d", conv=cfg.conv, **cfg.options)
    predictor = _Predictor(model)
    context = int(predictor.context[0])
    sampler = Sampler(raw, labels, train_roi, cfg.out_size, context, cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step, best, log_path = 0, math.inf, out / "log.csv"
    if resume and (out / "last.pt").is_file():
        state = torch.load(out / "last.pt", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best"]
        sampler.rng = np.random.default_rng(cfg.seed + step)
        print(f"resumed at iteration {step} (best VI {best:.4f})", flush=True)
    elif log_path.exists():
        log_path.unlink()
    model.train()
    losses, started = [], time.time()
    bar = tqdm(total=cfg.iterations, initial=step, desc=f"train em {cfg.conv}")
    while step < cfg.iterations:
        batch = [sampler.sample() for _ in range(cfg.batch)]
        x, target, mask, weight = (torch.from_numpy(np.stack(parts)) for parts in zip(*batch))
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, cfg)
        prediction = model(x[:, None])
        loss = F.binary_cross_entropy(prediction.clamp(1e-6, 1 - 1e-6), target, weight=weight, reduction="sum")
        loss = loss / mask.sum().clamp(min=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if step % cfg.val_every == 0 or step == cfg.iterations:
            result = validate(model, raw, labels, val_roi)
            scores = result["per_threshold"][result["best_threshold"]]
            new_file = not log_path.exists()
            with log_path.open("a", newline="") as handle:
                writer = csv.writer(handle)
                if new_file:
                    writer.writerow(["iteration", "train_loss", "val_voi", "val_voi_split", "val_voi_merge",
                                     "val_rand_error", "val_best_threshold", "seconds"])
                writer.writerow([step, f"{np.mean(losses):.4f}", f"{result['voi']:.4f}",
                                 f"{scores['voi_split']:.4f}", f"{scores['voi_merge']:.4f}",
                                 f"{scores['adapted_rand_error']:.4f}", result["best_threshold"],
                                 int(time.time() - started)])
            losses = []
            if result["voi"] < best:
                best = result["voi"]
                torch.save(model.state_dict(), out / "best.pt")
                (out / "best.json").write_text(json.dumps({"iteration": step, **result}, indent=2, default=float))
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "best": best}, out / "last.pt")
            _plot(log_path, out / "curves.png")
    bar.close()
    if cfg.export:
        model.load_state_dict(torch.load(out / "best.pt", weights_only=True))
        best_result = json.loads((out / "best.json").read_text())
        card = ModelCard(
            backbone="unet3d", conv=cfg.conv, options=cfg.options, in_channels=1, out_channels=3,
            task="nearest-neighbour affinities (z, y, x) of FIB-SEM neuron boundaries",
            labels={0: "affinity z", 1: "affinity y", 2: "affinity x"},
            orientation="zyx", spacing=tuple(raw.voxel_size), normalisation="divide-by-dtype-max",
            parameters=sum(p.numel() for p in model.parameters()),
            training={"data": cfg.data_source, "terms": cfg.data_terms, "raw": cfg.raw, "labels": cfg.labels,
                      "train_roi": str(train_roi), "val_roi": str(val_roi), "iterations": cfg.iterations,
                      "batch": cfg.batch, "out_size": cfg.out_size, "lr": cfg.lr, "seed": cfg.seed},
            metrics={"val_iteration": best_result["iteration"], "val_best_threshold": best_result["best_threshold"],
                     "val_voi": best_result["voi"],
                     "val_per_threshold": best_result["per_threshold"]},
        )
        save_weights(model, card, cfg.export)
        print(f"exported {cfg.export}", flush=True)
    return out


def _plot(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(log_path.open()))
    it = [int(r["iteration"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(it, [float(r["train_loss"]) for r in rows], label="train loss (balanced BCE)")
    ax1.set_xlabel("iteration")
    ax1.legend()
    for key in ("val_voi", "val_voi_split", "val_voi_merge"):
        ax2.plot(it, [float(r[key]) for r in rows], label=key.replace("val_", ""))
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("validation VI (bits, best threshold)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
