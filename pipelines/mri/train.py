"""Patch-based training of an MRI tissue model, resumable, with a CSV log, a curve
plot, best/last checkpoints, and an exported weights file with its model card (the
run-folder mechanics are the scaffold shared with EM, ``psc.pipelines.training``)."""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from tqdm import tqdm

from psc.models import build_model
from psc.models.weights import MRI_TISSUE, ModelCard, load_weights
from psc.utils.errors import InputError

from ..precision import autocast, resolve_precision
from ..training import Panel, Run, SamplerHooks, warmup_cosine

from . import config
from .metrics import dice_per_class
from .data import (check_augmentation, find_pairs, needs_raw, prepare_case, sampler_input, sampler_state,
                   set_sampler_state, training_transforms)



@dataclass
class TrainConfig:
    data: str
    out: str
    conv: str = "p2sc2"
    backbone: str = config.BACKBONE
    options: dict = field(default_factory=lambda: dict(config.BACKBONE_OPTIONS))
    val_cases: list = field(default_factory=lambda: ["IBSR_07", "IBSR_16"])
    iterations: int = 1500
    val_every: int = 100
    batch: int = 2
    patch: tuple = config.PATCH_SIZE
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 50
    class_ratios: tuple = (0.5, 1.5, 1.0, 1.0)
    spacing: tuple = config.SPACING
    seed: int = 0
    threads: int = 0
    export: str = ""
    data_source: str = ""  # who made the training data (goes on the model card)
    data_terms: str = ""  # the terms it comes under (goes on the model card)
    init: str = ""  # weights to start from (fine-tuning), same backbone, conv and options
    precision: str = "fp32"  # fp32, or bf16 autocast (fast on CPUs with AVX512-BF16/AMX)
    normalisation: str = config.NORMALISATION  # intensity transform (pipelines/mri/preprocess), onto the card
    # the augmentation recipe (data.AUGMENTATIONS), onto the card: "robust" (scanner and
    # resolution augmentation of the unnormalised case, pipelines/mri/augment.py) or
    # "basic" (mild intensity changes of the normalised patch: every model before issue 13)
    augmentation: str = "robust"


def validate(model: torch.nn.Module, cases: list[dict], classes: int) -> dict[str, list[float]]:
    model.eval()
    inferer = SlidingWindowInferer(roi_size=config.INFERENCE_WINDOW, overlap=0.25, mode="gaussian", sw_batch_size=1)
    results = {}
    with torch.inference_mode():
        for case in cases:
            image = case["image"][None].contiguous(memory_format=torch.channels_last_3d)
            logits = inferer(image, model)
            scores = dice_per_class(logits.argmax(1)[0].numpy(), case["label"][0].numpy(), range(1, classes))
            results[case["case"]] = list(scores.values())
    model.train()
    return results


def _start_from(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Fine-tuning: take the weights of ``cfg.init`` (hash-checked by its card), which
    must describe the very network being trained, fed the same way (normalisation)."""
    init, card = load_weights(cfg.init, kind=MRI_TISSUE)
    as_json = lambda options: {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}  # noqa: E731
    if (cfg.backbone, cfg.conv, as_json(cfg.options)) != (card.backbone, card.conv, as_json(card.options)):
        raise InputError(f"--init {cfg.init} is a {card.backbone}/{card.conv} with options {card.options}, "
                         f"not the {cfg.backbone}/{cfg.conv} with {cfg.options} being trained")
    if card.normalisation != cfg.normalisation:
        raise InputError(f"--init {cfg.init} was trained on {card.normalisation!r} inputs, not the "
                         f"{cfg.normalisation!r} of this run")
    model.load_state_dict(init.state_dict())


def train(cfg: TrainConfig, resume: bool = False, stop_after: int | None = None) -> Path:
    """Train as ``cfg`` says in ``cfg.out``; ``resume`` continues exactly from its
    ``last.pt``. ``stop_after``: stop after the checkpoint at that iteration, as if
    killed (tests of resume); nothing is exported then."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    check_augmentation(cfg.augmentation)
    set_determinism(cfg.seed)  # seeds torch, random, numpy; a resume then restores their states
    random.seed(cfg.seed)

    pairs = find_pairs(cfg.data)
    if not pairs:
        raise InputError(f"no (image, <stem>_seg) pairs found under {cfg.data}")
    known = {p.case for p in pairs}
    missing = [c for c in cfg.val_cases if c not in known]
    if missing:
        raise InputError(f"validation cases not found: {missing}")
    train_pairs = [p for p in pairs if p.case not in cfg.val_cases]
    val_pairs = [p for p in pairs if p.case in cfg.val_cases]
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=list) + "\n")

    print(f"preparing {len(train_pairs)} training and {len(val_pairs)} validation scans", flush=True)
    train_cases = [prepare_case(p, cfg.spacing, normalisation=cfg.normalisation, raw=needs_raw(cfg.augmentation))
                   for p in tqdm(train_pairs, desc="train scans", file=sys.stdout)]
    val_cases = [prepare_case(p, cfg.spacing, normalisation=cfg.normalisation) for p in tqdm(val_pairs, desc="val scans", file=sys.stdout)]
    classes = len(config.LABELS)
    sampler = training_transforms(cfg.patch, cfg.batch, classes, cfg.class_ratios, augmentation=cfg.augmentation,
                                  spacing=cfg.spacing, normalisation=cfg.normalisation)
    sampler.set_random_state(seed=cfg.seed)

    model = build_model(cfg.backbone, conv=cfg.conv, in_channels=1, out_channels=classes, **cfg.options)
    if cfg.init:
        _start_from(model, cfg)
    model = model.to(memory_format=torch.channels_last_3d)
    dtype = resolve_precision(cfg.precision, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine(optimizer, cfg.iterations, cfg.warmup)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    hooks = SamplerHooks(state=lambda: sampler_state(sampler), restore=lambda s: set_sampler_state(sampler, s),
                         reseed=lambda step: sampler.set_random_state(seed=cfg.seed + step))
    dice = ("val_dice_csf", "val_dice_gm", "val_dice_wm", "val_dice_mean")
    run = Run(out, model, optimizer, scheduler, hooks,
              columns=["iteration", "train_loss", "lr", *dice, "seconds"],
              panels=[Panel({"train_loss": "train loss (Dice+CE)"}),
                      Panel({k: k.replace("val_dice_", "") for k in dice}, "validation Dice", (0, 1))],
              higher_is_better=True, score_name="mean Dice")
    run.start(resume)

    def train_step() -> float:
        case = train_cases[random.randrange(len(train_cases))]
        patches = sampler(sampler_input(case, cfg.augmentation))
        image = torch.stack([p["image"].as_tensor() if hasattr(p["image"], "as_tensor") else p["image"] for p in patches])
        label = torch.stack([p["label"].as_tensor() if hasattr(p["label"], "as_tensor") else p["label"] for p in patches])
        image = image.float().contiguous(memory_format=torch.channels_last_3d)
        optimizer.zero_grad(set_to_none=True)
        with autocast("cpu", dtype):
            logits = model(image)
        loss = loss_fn(logits.float(), label.long())
        loss.backward()
        optimizer.step()
        return loss.item()

    def validation(step: int) -> tuple[float, dict]:
        if not val_cases:  # every case trains (the shipped model): nothing to score, the last weights export
            return math.nan, {k: "" for k in dice}
        scores = validate(model, val_cases, classes)
        per_class = np.nanmean(np.array(list(scores.values())), axis=0)
        mean = float(np.mean(per_class))
        return mean, {**{k: f"{v:.4f}" for k, v in zip(dice[:3], per_class)}, "val_dice_mean": f"{mean:.4f}"}

    model.train()
    if not run.fit(cfg.iterations, cfg.val_every, train_step, validation, stop_after=stop_after,
                   desc=f"train {cfg.conv}"):
        return out

    if cfg.export:
        if val_cases:
            best_row = max(run.log.rows(), key=lambda r: float(r["val_dice_mean"]))
            metrics = {"val_dice_model_space": {k: float(best_row[k]) for k in dice},
                       "best_iteration": int(best_row["iteration"])}
        else:
            metrics = {"selection": f"last iteration ({cfg.iterations}); no validation cases, every case trained"}
        card = ModelCard(
            backbone=cfg.backbone, conv=cfg.conv, options=cfg.options, in_channels=1, out_channels=classes,
            task="brain tissue segmentation of skull-stripped T1 MRI", labels=dict(config.LABELS),
            orientation=config.ORIENTATION, spacing=tuple(cfg.spacing), normalisation=cfg.normalisation,
            training={
                "data": cfg.data_source or "unspecified (give --data-source)",
                "terms": cfg.data_terms or "unspecified (give --data-terms)",
                "train_cases": [p.case for p in train_pairs], "val_cases": [p.case for p in val_pairs],
                "iterations": cfg.iterations, "batch": cfg.batch, "patch": list(cfg.patch), "lr": cfg.lr,
                "seed": cfg.seed, "precision": cfg.precision, "init": cfg.init or None,
                "augmentation": cfg.augmentation,
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            },
            metrics=metrics,
        )
        run.export(card, cfg.export, weights="best" if val_cases else "last")
    return out
