"""psc-train em on a synthetic volume: targets, loss going down, checkpoints, resume and
the exported model card."""

from __future__ import annotations

import json

import numpy as np
import torch

from psc.app.train import main as train_main
from psc.models.weights import load_weights
from psc.pipelines.em.affinities import affinities_from_labels, balance_weights
from psc.pipelines.em.train import EMTrainConfig, train

from em_fixtures import TINY_OPTIONS, synthetic_raw


def test_affinity_targets_follow_the_labels_and_mask_the_boundary_interior():
    labels = np.zeros((4, 5, 6), np.int64)
    labels[:, :, :3], labels[:, :, 4:] = 1, 2  # x = 3 is a boundary (label 0) column
    target, mask = affinities_from_labels(labels, background=0)
    assert target[2, 0, 0, 1] == 1 and mask[2, 0, 0, 1] == 1  # inside object 1
    assert target[2, 0, 0, 3] == 0 and mask[2, 0, 0, 3] == 1  # object 1 -> boundary: cut
    assert target[2, 0, 0, 0] == 0 and mask[2, 0, 0, 0] == 0  # no neighbour before x = 0
    assert target[1, 0, 1, 3] == 0 and mask[1, 0, 1, 3] == 0  # boundary -> boundary: unknown
    weights = balance_weights(target, mask)
    for channel in range(3):
        positive = (weights[channel] * target[channel]).sum()
        negative = (weights[channel] * (1 - target[channel]) * mask[channel]).sum()
        if positive and negative:
            assert np.isclose(positive, negative)


def test_training_lowers_the_loss_checkpoints_resumes_and_exports(tmp_path, capsys):
    raw, _, _ = synthetic_raw(tmp_path, shape=(32, 48, 64))
    out = tmp_path / "run"
    # the basic recipe without long-range targets: 40 steps on a tiny volume must learn
    cfg = EMTrainConfig(raw=str(raw / "raw"), labels=str(raw / "labels"), out=str(out), conv="p1sc1",
                        options=TINY_OPTIONS, out_size=8, batch=2, iterations=40, val_every=20, lr=3e-3,
                        threads=1, export=str(tmp_path / "w.pt"), data_source="synthetic", data_terms="none",
                        augmentation="basic", long_range=[])
    train(cfg)
    rows = [line.split(",") for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [20, 40]
    assert float(rows[1][1]) < float(rows[0][1])  # mean training loss went down
    assert all(np.isfinite(float(r[2])) for r in rows)  # validation VI computed
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file() and (out / "curves.png").is_file()
    model, card = load_weights(tmp_path / "w.pt")
    assert card.backbone == "unet3d" and card.conv == "p1sc1" and card.training["terms"] == "none"
    assert "val_best_threshold" in card.metrics and card.parameters == sum(p.numel() for p in model.parameters())

    # resume to 60 iterations from last.pt: the log goes on, nothing restarts
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["step"] == 40
    code = train_main(["em", "--raw", str(raw / "raw"), "--labels", str(raw / "labels"), "--out", str(out),
                       "--conv", "p1sc1", "--options", json.dumps(TINY_OPTIONS), "--out-size", "8",
                       "--iterations", "60", "--val-every", "20", "--threads", "1", "--resume",
                       "--augmentation", "basic", "--long-range"])
    assert code == 0
    assert "resumed at iteration 40" in capsys.readouterr().out
    rows = (out / "log.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [20, 40, 60]
