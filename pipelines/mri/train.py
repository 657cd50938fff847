"""Patch-based training of an MRI tissue model, resumable, with a CSV log, a curve
plot, best/last checkpoints, and an exported weights file with its model card."""

from __future__ import annotations

import csv
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.utils import set_determinism
from tqdm import tqdm

from psc.models import build_model
from psc.models.weights import ModelCard, load_weights, save_weights

from ..precision import autocast, resolve_precision

from . import config
from .metrics import dice_per_class
from .data import find_pairs, prepare_case, training_transforms


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


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.iterations - cfg.warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


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


def _plot(log_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(log_path.open()))
    if not rows:
        return
    it = [int(r["iteration"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(it, [float(r["train_loss"]) for r in rows], label="train loss (Dice+CE)")
    ax1.set_xlabel("iteration")
    ax1.legend()
    for key in ("val_dice_csf", "val_dice_gm", "val_dice_wm", "val_dice_mean"):
        ax2.plot(it, [float(r[key]) for r in rows], label=key.replace("val_dice_", ""))
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("validation Dice")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _start_from(model: torch.nn.Module, cfg: TrainConfig) -> None:
    """Fine-tuning: take the weights of ``cfg.init`` (hash-checked by its card), which
    must describe the very network being trained."""
    init, card = load_weights(cfg.init)
    as_json = lambda options: {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}  # noqa: E731
    if (cfg.backbone, cfg.conv, as_json(cfg.options)) != (card.backbone, card.conv, as_json(card.options)):
        raise ValueError(f"--init {cfg.init} is a {card.backbone}/{card.conv} with options {card.options}, "
                         f"not the {cfg.backbone}/{cfg.conv} with {cfg.options} being trained")
    model.load_state_dict(init.state_dict())


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_determinism(cfg.seed)
    random.seed(cfg.seed)

    pairs = find_pairs(cfg.data)
    if not pairs:
        raise ValueError(f"no (image, <stem>_seg) pairs found under {cfg.data}")
    known = {p.case for p in pairs}
    missing = [c for c in cfg.val_cases if c not in known]
    if missing:
        raise ValueError(f"validation cases not found: {missing}")
    train_pairs = [p for p in pairs if p.case not in cfg.val_cases]
    val_pairs = [p for p in pairs if p.case in cfg.val_cases]
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2, default=list) + "\n")

    print(f"preparing {len(train_pairs)} training and {len(val_pairs)} validation scans", flush=True)
    train_cases = [prepare_case(p, cfg.spacing) for p in tqdm(train_pairs, desc="train scans", file=sys.stdout)]
    val_cases = [prepare_case(p, cfg.spacing) for p in tqdm(val_pairs, desc="val scans", file=sys.stdout)]
    classes = len(config.LABELS)
    sampler = training_transforms(cfg.patch, cfg.batch, classes, cfg.class_ratios)
    sampler.set_random_state(seed=cfg.seed)

    model = build_model(cfg.backbone, conv=cfg.conv, in_channels=1, out_channels=classes, **cfg.options)
    if cfg.init:
        _start_from(model, cfg)
    model = model.to(memory_format=torch.channels_last_3d)
    dtype = resolve_precision(cfg.precision, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    step, best, elapsed_before = 0, -1.0, 0.0
    log_path = out / "log.csv"
    if resume and (out / "last.pt").is_file():
        state = torch.load(out / "last.pt", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, best = state["step"], state["best"]
        elapsed_before = state.get("seconds", 0.0)  # the log's clock runs on across resumes
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
        sampler.set_random_state(seed=cfg.seed + step)
        print(f"resumed at iteration {step} (best mean Dice {best:.4f})", flush=True)
    elif log_path.exists():
        log_path.unlink()

    fields = ["iteration", "train_loss", "lr", "val_dice_csf", "val_dice_gm", "val_dice_wm", "val_dice_mean", "seconds"]
    if not log_path.exists():
        with log_path.open("w", newline="") as handle:
            csv.writer(handle).writerow(fields)

    model.train()
    losses: list[float] = []
    started = time.time()
    bar = tqdm(total=cfg.iterations, initial=step, desc=f"train {cfg.conv}", file=sys.stdout, mininterval=30)
    while step < cfg.iterations:
        case = train_cases[random.randrange(len(train_cases))]
        patches = sampler({"image": case["image"], "label": case["label"]})
        image = torch.stack([p["image"].as_tensor() if hasattr(p["image"], "as_tensor") else p["image"] for p in patches])
        label = torch.stack([p["label"].as_tensor() if hasattr(p["label"], "as_tensor") else p["label"] for p in patches])
        image = image.float().contiguous(memory_format=torch.channels_last_3d)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        with autocast("cpu", dtype):
            logits = model(image)
        loss = loss_fn(logits.float(), label.long())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        step += 1
        bar.update(1)
        if step % cfg.val_every == 0 or step == cfg.iterations:
            scores = validate(model, val_cases, classes)
            per_class = np.nanmean(np.array(list(scores.values())), axis=0)
            mean = float(np.mean(per_class))
            row = [step, f"{np.mean(losses):.4f}", f"{_lr_at(step - 1, cfg):.2e}",
                   *(f"{v:.4f}" for v in per_class), f"{mean:.4f}", f"{elapsed_before + time.time() - started:.0f}"]
            with log_path.open("a", newline="") as handle:
                csv.writer(handle).writerow(row)
            losses = []
            bar.write(f"iteration {step}: loss {row[1]} val Dice CSF/GM/WM {row[3]}/{row[4]}/{row[5]} mean {row[6]}")
            if mean > best:
                best = mean
                torch.save(model.state_dict(), out / "best.pt")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "best": best,
                        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
                        "numpy_rng": np.random.get_state(),
                        "seconds": elapsed_before + time.time() - started}, out / "last.pt.tmp")
            (out / "last.pt.tmp").replace(out / "last.pt")
            _plot(log_path, out / "curves.png")
    bar.close()

    if cfg.export:
        model.load_state_dict(torch.load(out / "best.pt", weights_only=True))
        rows = list(csv.DictReader(log_path.open()))
        best_row = max(rows, key=lambda r: float(r["val_dice_mean"]))
        card = ModelCard(
            backbone=cfg.backbone, conv=cfg.conv, options=cfg.options, in_channels=1, out_channels=classes,
            task="brain tissue segmentation of skull-stripped T1 MRI", labels=dict(config.LABELS),
            orientation=config.ORIENTATION, spacing=tuple(cfg.spacing), normalisation=config.NORMALISATION,
            training={
                "data": cfg.data_source or "unspecified (give --data-source)",
                "terms": cfg.data_terms or "unspecified (give --data-terms)",
                "train_cases": [p.case for p in train_pairs], "val_cases": [p.case for p in val_pairs],
                "iterations": cfg.iterations, "batch": cfg.batch, "patch": list(cfg.patch), "lr": cfg.lr,
                "seed": cfg.seed, "precision": cfg.precision, "init": cfg.init or None,
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            },
            metrics={"val_dice_model_space": {k: float(best_row[k]) for k in
                                               ("val_dice_csf", "val_dice_gm", "val_dice_wm", "val_dice_mean")},
                     "best_iteration": int(best_row["iteration"])},
        )
        save_weights(model, card, cfg.export)
        print(f"exported {cfg.export}", flush=True)
    return out
