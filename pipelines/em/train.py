"""Training the affinity U-Net from one or more raw volumes and their instance labels.

Several volumes (e.g. FIB-25 and NeuroProof: two samples, two imaging domains) train one
model: each step's crops come from a volume drawn with probability proportional to the
square root of its training voxels, so a small volume is not drowned by a large one nor
a large one wasted. Each volume is normalised by its own measured intensities
(``normalise``: ``robust-percentiles`` by default, the transform the card names and
predict applies) and holds out its own validation region: the last ``val_fraction`` of
its longest axis.

Random crops (output ``out_size``; input grown by the network's context, mirrored at the
volume border like inference) are augmented (``augment``: section defects, elastic
deformation, flips and transposes, intensity) *before* the affinity targets are computed,
so targets always match the augmented labels. Targets: the nearest-neighbour affinities
the pipeline segments, plus long-range affinities at ``long_range`` distances as
auxiliary outputs (they make the network see more of each object's shape; Lee et al.
2017, arXiv:1706.00120; Wolf et al. 2018, the mutex watershed), and, with ``lsd_sigma``,
the ten local shape descriptors of ``lsd`` (Sheridan et al. 2022) as further auxiliary
outputs. Loss: binary cross-entropy weighted so that boundary and non-boundary edges of
each channel count equally, label-0 interior masked; plus, for the descriptors, their
squared error summed over the ten channels and averaged over object voxels. Every
``val_every`` iterations each volume's held-out region is segmented with the full
post-processing; the threshold with the lowest mean VI over the volumes is that
validation's threshold, and that mean VI selects the checkpoint.
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
from psc.models.weights import EM_AFFINITY, ModelCard
from psc.utils.errors import InputError
from psc.utils.files import atomic_write

from ..training import Panel, Run, SamplerHooks, warmup_cosine

from .affinities import affinities_from_labels, balance_weights, channel_names, known_pairs, long_range_offsets
from .augment import RECIPES, AugmentConfig, Augmenter
from .intensity import measure
from .lsd import CHANNELS as LSD_CHANNELS
from .lsd import local_shape_descriptors, window_radius
from .metrics import evaluate
from .normalise import DEFAULT_NORMALISATION, normaliser
from .postprocess import segment_affinities
from .predict import AffinityPredictor
from .volumes import Volume, open_volume, read_clamped

BACKBONE_OPTIONS = {"num_fmaps": 12, "fmap_inc_factor": 3, "downsample_factors": [[2, 2, 2], [2, 2, 2]]}
VAL_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
LONG_RANGE = (3, 9)  # auxiliary affinity distances (voxels) of the default recipe
AUGMENTATIONS = tuple(RECIPES)


@dataclass
class EMTrainConfig:
    raw: list  # raw volumes (zarr container/array; one path alone is taken as a list of one)
    labels: list  # their instance labels, one per raw
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
    long_range: list = field(default_factory=lambda: list(LONG_RANGE))  # [] : nearest-neighbour targets only
    augmentation: str = "full"  # full: augment.AugmentConfig; basic: flips, transposes, mild intensity
    lsd_sigma: float = 0.0  # > 0: local shape descriptors (lsd.py) as auxiliary targets, window sigma in voxels

    def __post_init__(self) -> None:
        self.raw = [self.raw] if isinstance(self.raw, str) else list(self.raw)
        self.labels = [self.labels] if isinstance(self.labels, str) else list(self.labels)
        if len(self.raw) != len(self.labels) or not self.raw:
            raise InputError(f"give one labels volume per raw volume ({len(self.raw)} raw, "
                             f"{len(self.labels)} labels)")
        if self.augmentation not in AUGMENTATIONS:
            raise InputError(f"augmentation {self.augmentation!r}: one of {', '.join(AUGMENTATIONS)}")
        if any(int(d) < 2 for d in self.long_range):
            raise InputError(f"long-range distances must be 2 voxels or more (got {self.long_range})")
        if not self.lsd_sigma >= 0:
            raise InputError(f"--lsd-sigma must be 0 (no shape descriptors) or positive (got {self.lsd_sigma})")

    @property
    def offsets(self) -> tuple[tuple[int, int, int], ...]:
        return long_range_offsets(tuple(int(d) for d in self.long_range))

    @property
    def out_channels(self) -> int:
        """Affinity channels, then the ten shape descriptors when they are trained."""
        return len(self.offsets) + (len(LSD_CHANNELS) if self.lsd_sigma else 0)


def held_out_split(shape: tuple[int, ...], fraction: float, grid: int = 4) -> tuple[Roi, Roi]:
    """(training, validation) regions: the last ``fraction`` of the longest axis (the last
    of equally long ones) is held out, cut on the pooling grid."""
    axis = max(range(3), key=lambda a: (shape[a], a))
    split = int(round(shape[axis] * (1 - fraction))) // grid * grid
    train_shape, val_begin, val_shape = list(shape), [0, 0, 0], list(shape)
    train_shape[axis], val_begin[axis], val_shape[axis] = split, split, shape[axis] - split
    return Roi((0, 0, 0), train_shape), Roi(val_begin, val_shape)


@dataclass
class TrainingVolume:
    """One labelled volume: its arrays, regions and measured intensities."""

    name: str
    raw: Volume
    labels: Volume
    train_roi: Roi
    val_roi: Roi
    intensity: dict

    @classmethod
    def open(cls, raw_path: str, labels_path: str, val_fraction: float) -> "TrainingVolume":
        raw, labels = open_volume(raw_path), open_volume(labels_path)
        if raw.shape != labels.shape:
            raise InputError(f"raw {raw_path} {raw.shape} and labels {labels_path} {labels.shape} differ in shape")
        train_roi, val_roi = held_out_split(tuple(raw.shape), val_fraction)
        intensity, _ = measure(raw, raw_path)
        return cls(raw_path, raw, labels, train_roi, val_roi, intensity)


class Sampler:
    """Random augmented training crops with their affinity targets (and, with
    ``lsd_sigma``, shape-descriptor targets after them), from the training regions of the
    volumes."""

    def __init__(self, volumes: list[TrainingVolume], out_size: int, context: int, seed: int,
                 normalisation: str = DEFAULT_NORMALISATION, offsets=long_range_offsets(()),
                 augmentation: AugmentConfig = AugmentConfig(), lsd_sigma: float = 0.0):
        self.volumes = volumes
        self.normalise = [normaliser(normalisation, v.intensity) for v in volumes]
        weights = np.sqrt([float(np.prod(v.train_roi.shape)) for v in volumes])
        self.weights = weights / weights.sum()
        self.out, self.context, self.offsets = out_size, context, offsets
        # labels reach this far before the output crop, so every edge has both voxels
        self.margin = max(1, max(-min(o) for o in offsets))
        self.augmentation = augmentation
        self.lsd_sigma = float(lsd_sigma)
        # a descriptor's window reaches this far past the output: labels are read there too
        self.lsd_reach = window_radius(lsd_sigma) if lsd_sigma else 0
        if self.lsd_reach > context:
            raise InputError(f"--lsd-sigma {lsd_sigma}: its window ({self.lsd_reach} voxels each side) reaches "
                             f"past the network's context ({context} voxels); use a sigma of at most "
                             f"{context / 3:.1f}")
        self.rng = np.random.default_rng(seed)

    def sample(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        index = int(self.rng.choice(len(self.volumes), p=self.weights))
        volume = self.volumes[index]
        # the crop is cubic so transposes keep shapes; + margin so edges to neighbours
        # before the output's first slice have a label on both sides
        size = self.out + self.margin
        roi = volume.train_roi
        begin = [self.rng.integers(lo, max(lo, hi - size) + 1) for lo, hi in zip(roi.begin, roi.end)]
        label_roi = Roi(begin, (size,) * 3)
        input_roi = label_roi.grow((self.context,) * 3, (self.context,) * 3)
        raw = self.normalise[index](read_clamped(volume.raw, input_roi))
        reach = self.lsd_reach  # 0 without shape descriptors: labels of the output crop only
        read_roi = label_roi.grow((reach,) * 3, (reach,) * 3)
        labels = read_clamped(volume.labels, read_roi)
        # voxels mirrored in from outside the training region have no trustworthy label
        inside = np.zeros(labels.shape, bool)
        inside_roi = read_roi.intersect(roi) - read_roi.offset
        inside[inside_roi.to_slices()] = True
        big_labels = np.zeros(raw.shape, np.int64)
        c = self.context
        r = (slice(c - reach, c + size + reach),) * 3
        big_labels[r] = np.where(inside, labels.astype(np.int64) + 1, 0)
        raw, big_labels = Augmenter(self.rng, self.augmentation)(raw, big_labels)
        if self.lsd_sigma:
            # objects are the data's labels > 0 (0 = boundary and unknown voxels get none)
            # only on the output voxels the targets keep (after the edge margin)
            wanted = (slice(reach + self.margin, reach + size),) * 3
            lsd_target, lsd_mask = local_shape_descriptors(np.maximum(big_labels[r] - 1, 0), self.lsd_sigma, wanted)
        labels = big_labels[c:c + size, c:c + size, c:c + size]
        known = labels > 0
        labels = labels - 1  # back to the data's labels; -1 = unknown
        target, mask = affinities_from_labels(np.where(known, labels, 0), background=0, offsets=self.offsets)
        mask *= known_pairs(known, self.offsets)  # an edge is trusted only if both its voxels are known
        m = self.margin
        crop = (slice(None), slice(m, None), slice(m, None), slice(m, None))
        target, mask = target[crop], mask[crop]
        weight = balance_weights(target, mask)
        if self.lsd_sigma:
            lsd_weight = np.broadcast_to(lsd_mask[None], lsd_target.shape)
            target = np.concatenate([target, lsd_target])
            mask = np.concatenate([mask, lsd_weight])
            weight = np.concatenate([weight, lsd_weight])
        return (np.ascontiguousarray(raw[m:, m:, m:]), np.ascontiguousarray(target), np.ascontiguousarray(mask),
                np.ascontiguousarray(weight))


def training_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                  affinity_channels: int) -> torch.Tensor:
    """The loss of a batch (``Sampler.sample``'s arrays, stacked): balanced binary
    cross-entropy over the first ``affinity_channels`` channels per known edge, plus, when
    shape-descriptor channels follow, their squared error summed over the ten channels and
    averaged over object voxels (so it weighs about as much as the affinities' term)."""
    n = affinity_channels
    loss = F.binary_cross_entropy(prediction[:, :n].clamp(1e-6, 1 - 1e-6), target[:, :n], weight=weight[:, :n],
                                  reduction="sum") / mask[:, :n].sum().clamp(min=1)
    if prediction.shape[1] > n:
        squared = (weight[:, n:] * (prediction[:, n:] - target[:, n:]) ** 2).sum()
        loss = loss + squared / weight[:, n].sum().clamp(min=1)
    return loss


def validate(model: torch.nn.Module, volumes: list[TrainingVolume], normalisation: str = DEFAULT_NORMALISATION) -> dict:
    """Each volume's held-out region segmented at every threshold and scored; the
    threshold with the lowest mean VI over the volumes is this validation's."""
    model.eval()
    per_volume = {}
    for volume in volumes:
        predictor = AffinityPredictor.from_model(model, normalisation, volume.intensity)
        affinities = predictor.predict(volume.raw, volume.val_roi)
        gt = volume.labels.read(volume.val_roi)
        per_volume[volume.name] = {float(t): evaluate(segmentation, gt)
                                   for t, segmentation in segment_affinities(affinities, VAL_THRESHOLDS).items()}
    model.train()
    keys = ("voi", "voi_split", "voi_merge", "adapted_rand_error")
    per_threshold = {t: {k: float(np.mean([per_volume[v][t][k] for v in per_volume])) for k in keys}
                     for t in (float(t) for t in VAL_THRESHOLDS)}
    best = min(per_threshold, key=lambda t: per_threshold[t]["voi"])
    return {"per_threshold": per_threshold, "best_threshold": best, "voi": per_threshold[best]["voi"],
            "per_volume": {v: {"voi": scores[best]["voi"], "voi_split": scores[best]["voi_split"],
                               "voi_merge": scores[best]["voi_merge"]} for v, scores in per_volume.items()}}


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
    volumes = [TrainingVolume.open(r, l, cfg.val_fraction) for r, l in zip(cfg.raw, cfg.labels)]
    offsets = cfg.offsets
    model = build_model("unet3d", conv=cfg.conv, out_channels=cfg.out_channels, **cfg.options)
    context = int(AffinityPredictor.from_model(model, cfg.normalisation, volumes[0].intensity).context[0])
    sampler = Sampler(volumes, cfg.out_size, context, cfg.seed, cfg.normalisation, offsets,
                      RECIPES[cfg.augmentation], cfg.lsd_sigma)
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
              panels=[Panel({"train_loss": "train loss (balanced BCE"
                                           + (" + shape-descriptor MSE)" if cfg.lsd_sigma else ")")}),
                      Panel({k: k.replace("val_", "") for k in voi}, "validation VI (bits, best threshold)")],
              higher_is_better=False, score_name="VI", on_best=write_best)
    run.start(resume)

    def train_step() -> float:
        batch = [sampler.sample() for _ in range(cfg.batch)]
        x, target, mask, weight = (torch.from_numpy(np.stack(parts)) for parts in zip(*batch))
        loss = training_loss(model(x[:, None]), target, mask, weight, len(offsets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    def validation(step: int) -> tuple[float, dict]:
        result = validate(model, volumes, cfg.normalisation)
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
            backbone="unet3d", conv=cfg.conv, options=cfg.options, in_channels=1, out_channels=cfg.out_channels,
            task="nearest-neighbour affinities (z, y, x) of FIB-SEM neuron boundaries"
                 + (f", long-range affinities at {', '.join(map(str, cfg.long_range))} voxels (training targets)"
                    if cfg.long_range else "")
                 + (f", local shape descriptors at sigma {cfg.lsd_sigma:g} voxels (training targets)"
                    if cfg.lsd_sigma else ""),
            labels={**channel_names(offsets),
                    **({len(offsets) + i: name for i, name in enumerate(LSD_CHANNELS)} if cfg.lsd_sigma else {})},
            orientation="zyx", spacing=tuple(volumes[0].raw.voxel_size),
            normalisation=cfg.normalisation, kind=EM_AFFINITY,
            training={"data": cfg.data_source, "terms": cfg.data_terms,
                      "volumes": [{"raw": v.name, "labels": l, "voxel_size": list(v.raw.voxel_size),
                                   "train_roi": str(v.train_roi), "val_roi": str(v.val_roi)}
                                  for v, l in zip(volumes, cfg.labels)],
                      "iterations": cfg.iterations, "batch": cfg.batch, "out_size": cfg.out_size, "lr": cfg.lr,
                      "seed": cfg.seed, "long_range": list(cfg.long_range), "lsd_sigma": cfg.lsd_sigma,
                      "augmentation": cfg.augmentation,
                      "augment_config": asdict(RECIPES[cfg.augmentation])},
            metrics={"val_iteration": best_result["iteration"], "val_best_threshold": best_result["best_threshold"],
                     "val_voi": best_result["voi"], "val_per_volume": best_result.get("per_volume", {}),
                     "val_per_threshold": best_result["per_threshold"]},
        )
        run.export(card, cfg.export)
    return out
