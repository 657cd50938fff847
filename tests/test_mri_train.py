"""Training from labelled scans: a few steps on a phantom reduce the loss, resume
continues where it stopped, and the exported weights load with their card."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest
import torch

from psc.models import build_model
from psc.models.weights import WeightsError, load_weights
from psc.pipelines.mri.data import find_pairs, prepare_case
from psc.pipelines.mri.train import TrainConfig, train

TINY = {"init_channels": 4, "growth_rate": 4, "block_layers": [1, 1], "side_channels": 4}


def phantom(shape=(28, 24, 28), seed=0):
    """Concentric tissue: WM core, GM shell, CSF 'ventricle' inside, background out."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid**2).sum(0))
    label = np.zeros(shape, np.int16)
    label[radius < 0.9] = 2
    label[radius < 0.6] = 3
    label[(np.abs(grid[0]) < 0.15) & (radius < 0.35)] = 1
    means = np.array([0, 60, 110, 160])
    image = means[label] + rng.normal(0, 6, shape) * (label > 0)
    return image.astype(np.float32), label


def write_dataset(root, cases=3):
    affine = np.diag([1.0, 1.5, 1.0, 1.0])
    for i in range(cases):
        image, label = phantom(seed=i)
        folder = root / f"case{i}"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(image[..., None], affine), folder / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(label[..., None], affine), folder / f"case{i}_seg.nii.gz")


def config(tmp_path, iterations, **kw):
    return TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), conv="p2sc2", options=dict(TINY),
                       val_cases=["case2"], iterations=iterations, val_every=10, batch=2, patch=(16, 16, 16),
                       lr=1e-2, warmup=2, seed=0, threads=1, **kw)


def test_find_pairs_and_prepare(tmp_path):
    write_dataset(tmp_path / "data")
    pairs = find_pairs(tmp_path / "data")
    assert [p.case for p in pairs] == ["case0", "case1", "case2"]
    case = prepare_case(pairs[0], spacing=(1.0, 1.5, 1.0))
    image, label = case["image"], case["label"]
    assert image.shape == label.shape and image.shape[0] == 1
    brain = image[0][label[0] > 0]
    assert abs(float(brain.mean())) < 0.1 and abs(float(brain.std()) - 1) < 0.1  # z-scored inside the brain
    assert set(torch.unique(label).tolist()) == {0, 1, 2, 3}


def test_training_reduces_loss_resumes_and_exports(tmp_path):
    write_dataset(tmp_path / "data")
    train(config(tmp_path, 20))
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [10, 20]

    weights = tmp_path / "w.pt"
    train(config(tmp_path, 40, export=str(weights), data_source="phantoms", data_terms="public domain"), resume=True)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [10, 20, 30, 40]  # continued, not restarted
    seconds = [int(r["seconds"]) for r in rows]
    assert seconds == sorted(seconds)  # the clock runs on across the resume
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < 0.8 * losses[0], losses
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000

    model, card = load_weights(weights)
    assert card.conv == "p2sc2" and card.labels == {0: "background", 1: "CSF", 2: "GM", 3: "WM"}
    assert card.training["val_cases"] == ["case2"] and card.training["train_cases"] == ["case0", "case1"]
    assert card.training["data"] == "phantoms" and card.training["terms"] == "public domain"
    assert card.metrics["best_iteration"] in (10, 20, 30, 40)
    assert card.parameters == sum(p.numel() for p in model.parameters())

    weights.write_bytes(weights.read_bytes() + b"x")  # corrupt: the hash must catch it
    with pytest.raises(WeightsError, match="sha256"):
        load_weights(weights)


def test_training_on_every_case_exports_the_last_weights(tmp_path):
    """The shipped model trains on every case: no validation, so the log records the
    loss alone and the export is the model as the run ended (its ``last.pt``), not a
    best that was never measured."""
    write_dataset(tmp_path / "data")
    weights = tmp_path / "w.pt"
    cfg = config(tmp_path, 20, export=str(weights))
    cfg.val_cases = []
    train(cfg)
    rows = list(csv.DictReader((tmp_path / "run" / "log.csv").open()))
    assert [int(r["iteration"]) for r in rows] == [10, 20]
    assert all(r["val_dice_mean"] == "" for r in rows) and all(float(r["train_loss"]) > 0 for r in rows)
    assert not (tmp_path / "run" / "best.pt").exists()

    model, card = load_weights(weights)
    assert card.training["val_cases"] == [] and card.training["train_cases"] == ["case0", "case1", "case2"]
    assert "last iteration (20)" in card.metrics["selection"]
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["model"]
    exported = model.state_dict()
    assert all(torch.equal(exported[k], last[k].to(exported[k].dtype)) for k in exported)


def test_cli_reports_missing_data(tmp_path, capsys):
    from psc.app.train import main

    assert main(["mri", "--data", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psc-train: error: no (image")


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    """--init: a short, gentle fine-tuning run ends near the weights it started from,
    not near a fresh network; bf16 autocast trains too; a mismatched network is refused."""
    write_dataset(tmp_path / "data")
    first = tmp_path / "first.pt"
    train(config(tmp_path, 20, export=str(first)))
    start, _ = load_weights(first)

    tuned = tmp_path / "tuned.pt"
    cfg = config(tmp_path, 10, export=str(tuned), init=str(first), precision="bf16")
    cfg.out, cfg.lr = str(tmp_path / "tune"), 1e-4
    train(cfg)
    end, card = load_weights(tuned)
    assert card.training["init"] == str(first) and card.training["precision"] == "bf16"
    fresh = build_model("densenet3d", conv="p2sc2", in_channels=1, out_channels=4, **TINY)
    flat = lambda model: torch.cat([p.detach().flatten() for p in model.parameters()])  # noqa: E731
    moved, apart = (flat(end) - flat(start)).norm(), (flat(fresh) - flat(start)).norm()
    assert moved < 0.05 * apart, (moved, apart)

    other = config(tmp_path, 10, init=str(first))
    other.out, other.conv = str(tmp_path / "other"), "conv3d"
    with pytest.raises(ValueError, match="not the densenet3d/conv3d"):
        train(other)


def test_val_alone_means_every_case_trains():
    from psc.app.train import build_parser

    parse = build_parser().parse_args
    assert parse(["mri", "--data", "d", "--out", "o", "--val"]).val_cases == []
    assert parse(["mri", "--data", "d", "--out", "o"]).val_cases == ["IBSR_07", "IBSR_16"]
