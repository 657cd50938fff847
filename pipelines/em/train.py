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

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from funlib.geometry import Roi

from psc.models import build_model
from psc.models.weights import ModelCard
from psc.utils.errors import InputError
from psc.utils.files import atomic_write

from ..training import Panel, Run, SamplerHooks, warmup_cosine

from .affinities import affinities_from_labels, balance_weights
from .metrics import evaluate
from .normalise import DEFAULT_NORMALISATION, normaliser
from .postprocess import segment_affinities
from .predict import AffinityPredictor
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
    normalisation: str = DEFAULT_NORMALISATION  # raw -> network input (psc.pipelines.em.normalise), onto the card


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

    def __init__(self, raw: Volume, labels: Volume, train_roi: Roi, out_size: int, context: int, seed: int,
                 normalisation: str = DEFAULT_NORMALISATION):
        self.raw, self.labels, self.train_roi = raw, labels, train_roi
        self.normalise = normaliser(normalisation)
        self.out, self.context = out_size, context
        self.rng = np.random.default_rng(seed)

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # the crop is cubic so transposes keep shapes; +1 voxel so edges to the
        # neighbour before the first slice have a label on both sides
        size = self.out + 1
        begin = [self.rng.integers(lo, max(lo, hi - size) + 1) for lo, hi in zip(self.train_roi.begin, self.train_roi.end)]
        label_roi = Roi(begin, (size,) * 3)
        input_roi = label_roi.grow((self.context,) * 3, (self.context,) * 3)
        raw = self.normalise(read_clamped(self.raw, input_roi))
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


def validate(model: torch.nn.Module, raw: Volume, labels: Volume, val_roi: Roi,
             normalisation: str = DEFAULT_NORMALISATION) -> dict:
    model.eval()
    predictor = AffinityPredictor.from_model(model, normalisation)
    affinities = predictor.predict(raw, val_roi)
    model.train()
    gt = labels.read(val_roi)
    results = {}
    for threshold, segmentation in segment_affinities(affinities, VAL_THRESHOLDS).items():
        results[threshold] = evaluate(segmentation, gt)
    best = min(results, key=lambda t: results[t]["voi"])
    return {"per_threshold": results, "best_threshold": best, "voi": results[best]["voi"]}


def train(cfg: EMTrainConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    """Train as ``cfg`` says in ``cfg.out``; ``resume`` continues exactly from its
    ``last.pt`` (the run-folder mechanics are ``psc.pipelines.training``, shared with
    MRI). ``stop_after``: stop after the checkpoint at that iteration, as if killed
    (tests of resume); nothing is exported then."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(asdict(cfg), indent=2)))
    raw, labels = open_volume(cfg.raw), open_volume(cfg.labels)
    if raw.shape != labels.shape:
        raise InputError(f"raw {raw.shape} and labels {labels.shape} differ in shape")
    split = int(round(raw.shape[2] * (1 - cfg.val_fraction))) // 4 * 4  # on the pooling grid
    train_roi = Roi((0, 0, 0), (raw.shape[0], raw.shape[1], split))
    val_roi = Roi((0, 0, split), (raw.shape[0], raw.shape[1], raw.shape[2] - split))
    model = build_model("unet3d", conv=cfg.conv, **cfg.options)
    context = int(AffinityPredictor.from_model(model, cfg.normalisation).context[0])
    sampler = Sampler(raw, labels, train_roi, cfg.out_size, context, cfg.seed, cfg.normalisation)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = warmup_cosine(optimizer, cfg.iterations)  # cosine, no warm-up

    hooks = SamplerHooks(state=lambda: sampler.rng.bit_generator.state,
                         restore=lambda state: setattr(sampler.rng.bit_generator, "state", state),
                         reseed=lambda step: setattr(sampler, "rng", np.random.default_rng(cfg.seed + step)))
    latest: dict = {}  # the last validation's result, for best.json

    def write_best(step: int) -> None:
        text = json.dumps({"iteration": step, **latest}, indent=2, default=float)
        atomic_write(out / "best.json", lambda tmp: Path(tmp).write_text(text))

    voi = ("val_voi", "val_voi_split", "val_voi_merge")
    run = Run(out, model, optimizer, scheduler, hooks,
              columns=["iteration", "train_loss", *voi, "val_rand_error", "val_best_threshold", "seconds"],
              panels=[Panel({"train_loss": "train loss (balanced BCE)"}),
                      Panel({k: k.replace("val_", "") for k in voi}, "validation VI (bits, best threshold)")],
              higher_is_better=False, score_name="VI", on_best=write_best)
    run.start(resume)

    def train_step() -> float:
        batch = [sampler.sample() for _ in range(cfg.batch)]
        x, target, mask, weight = (torch.from_numpy(np.stack(parts)) for parts in zip(*batch))
        prediction = model(x[:, None])
        loss = F.binary_cross_entropy(prediction.clamp(1e-6, 1 - 1e-6), target, weight=weight, reduction="sum")
        loss = loss / mask.sum().clamp(min=1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    def validation(step: int) -> tuple[float, dict]:
        result = validate(model, raw, labels, val_roi, cfg.normalisation)
        latest.clear()
        latest.update(result)
        scores = result["per_threshold"][result["best_threshold"]]
        return result["voi"], {"val_voi": f"{result['voi']:.4f}", "val_voi_split": f"{scores['voi_split']:.4f}",
                               "val_voi_merge": f"{scores['voi_merge']:.4f}",
                               "val_rand_error": f"{scores['adapted_rand_error']:.4f}",
                               "val_best_threshold": result["best_threshold"]}

    model.train()
    if not run.fit(cfg.iterations, cfg.val_every, train_step, validation, stop_after=stop_after,
                   desc=f"train em {cfg.conv}"):
        return out
    if cfg.export:
        best_result = json.loads((out / "best.json").read_text())
        card = ModelCard(
            backbone="unet3d", conv=cfg.conv, options=cfg.options, in_channels=1, out_channels=3,
            task="nearest-neighbour affinities (z, y, x) of FIB-SEM neuron boundaries",
            labels={0: "affinity z", 1: "affinity y", 2: "affinity x"},
            orientation="zyx", spacing=tuple(raw.voxel_size), normalisation=cfg.normalisation,
            training={"data": cfg.data_source, "terms": cfg.data_terms, "raw": cfg.raw, "labels": cfg.labels,
                      "train_roi": str(train_roi), "val_roi": str(val_roi), "iterations": cfg.iterations,
                      "batch": cfg.batch, "out_size": cfg.out_size, "lr": cfg.lr, "seed": cfg.seed},
            metrics={"val_iteration": best_result["iteration"], "val_best_threshold": best_result["best_threshold"],
                     "val_voi": best_result["voi"],
                     "val_per_threshold": best_result["per_threshold"]},
        )
        run.export(card, cfg.export)
    return out
