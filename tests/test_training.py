"""The training scaffold shared by MRI and EM (psc.pipelines.training): a run killed
after a checkpoint and resumed equals an uninterrupted one bit for bit, checkpoints
are written atomically, the schedule is the one each pipeline had, the log keeps one
header, and nothing touches matplotlib's backend."""

from __future__ import annotations

import csv
import math
import shutil

import matplotlib
import numpy as np
import pytest
import torch

from psc.pipelines import training
from psc.pipelines.em.train import EMTrainConfig
from psc.pipelines.em.train import train as train_em
from psc.pipelines.mri.train import train as train_mri
from psc.pipelines.training import CsvLog, SamplerHooks, load_checkpoint, save_checkpoint, warmup_cosine

from em_fixtures import TINY_OPTIONS, synthetic_raw
from test_mri_train import config as mri_config
from test_mri_train import write_dataset


@pytest.fixture(autouse=True)
def backend_untouched(monkeypatch):
    """Training plots on a bare Figure: no matplotlib.use, no pyplot figure or backend
    switch; the backend that a napari user has (Qt) stays."""
    import matplotlib.pyplot as plt  # imported anyway (by MONAI), patched here

    backend = dict.__getitem__(matplotlib.rcParams, "backend")  # without resolving it

    def refuse(*args, **kwargs):
        raise AssertionError("training touched matplotlib's global state")

    monkeypatch.setattr(matplotlib, "use", refuse)
    monkeypatch.setattr(plt, "switch_backend", refuse)
    monkeypatch.setattr(plt, "figure", refuse)
    yield
    assert dict.__getitem__(matplotlib.rcParams, "backend") == backend


def rows_without_seconds(run):
    rows = list(csv.DictReader((run / "log.csv").open()))
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_run(whole, resumed) -> None:
    """Identical weights (last and best), optimiser moments and log rows but seconds."""
    last, other = (torch.load(run / "last.pt", weights_only=False) for run in (whole, resumed))
    assert last["step"] == other["step"] and last["best"] == other["best"]
    assert_same_state(last["model"], other["model"])
    for moments, others in zip(last["optimizer"]["state"].values(), other["optimizer"]["state"].values()):
        assert_same_state(moments, others)
    assert_same_state(*(torch.load(run / "best.pt", weights_only=True) for run in (whole, resumed)))
    assert rows_without_seconds(whole) == rows_without_seconds(resumed)


def make_legacy(source, folder, keys) -> None:
    """``folder`` as the earlier loops left it: the log and a last.pt with only ``keys``."""
    folder.mkdir()
    shutil.copy(source / "log.csv", folder / "log.csv")
    state = torch.load(source / "last.pt", weights_only=False)
    torch.save({k: state[k] for k in keys}, folder / "last.pt")


def differs(a, b) -> bool:
    models = [torch.load(run / "last.pt", weights_only=False)["model"] for run in (a, b)]
    return any(not torch.equal(models[0][k], models[1][k]) for k in models[0])


def test_mri_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    write_dataset(tmp_path / "data")

    def cfg(name):
        c = mri_config(tmp_path, 10)
        c.out, c.val_every = str(tmp_path / name), 5
        return c

    train_mri(cfg("whole"))
    train_mri(cfg("cut"), stop_after=5)
    cut = tmp_path / "cut"
    assert [r["iteration"] for r in rows_without_seconds(cut)] == ["5"]
    assert torch.load(cut / "last.pt", weights_only=False)["step"] == 5
    # the same folder as the loop before the scaffold would have left it
    make_legacy(cut, tmp_path / "legacy", ["model", "optimizer", "step", "best", "torch_rng", "python_rng",
                                           "numpy_rng", "seconds"])
    train_mri(cfg("cut"), resume=True)
    assert_same_run(tmp_path / "whole", cut)
    assert (cut / "curves.png").stat().st_size > 10_000

    capsys.readouterr()
    train_mri(cfg("legacy"), resume=True)
    out = capsys.readouterr().out
    assert "resumed at iteration 5" in out and "written by an older psc-train" in out
    assert [r["iteration"] for r in rows_without_seconds(tmp_path / "legacy")] == ["5", "10"]
    assert differs(tmp_path / "whole", tmp_path / "legacy")  # reseeded: why the new checkpoint holds more


def test_em_resume_equals_an_uninterrupted_run(tmp_path, capsys):
    raw, _, _ = synthetic_raw(tmp_path, shape=(32, 48, 64))

    def cfg(name):
        return EMTrainConfig(raw=str(raw / "raw"), labels=str(raw / "labels"), out=str(tmp_path / name),
                             conv="p1sc1", options=TINY_OPTIONS, out_size=8, batch=2, iterations=12, val_every=6,
                             lr=3e-3, threads=1)

    train_em(cfg("whole"))
    train_em(cfg("cut"), stop_after=6)
    cut = tmp_path / "cut"
    assert [r["iteration"] for r in rows_without_seconds(cut)] == ["6"]
    make_legacy(cut, tmp_path / "legacy", ["model", "optimizer", "step", "best"])
    train_em(cfg("cut"), resume=True)
    assert_same_run(tmp_path / "whole", cut)
    assert (cut / "best.json").read_text() == (tmp_path / "whole" / "best.json").read_text()

    capsys.readouterr()
    train_em(cfg("legacy"), resume=True)
    out = capsys.readouterr().out
    assert "resumed at iteration 6" in out and "written by an older psc-train" in out
    assert [r["iteration"] for r in rows_without_seconds(tmp_path / "legacy")] == ["6", "12"]
    assert differs(tmp_path / "whole", tmp_path / "legacy")


def tiny_training():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    hooks = SamplerHooks(state=lambda: rng.bit_generator.state,
                         restore=lambda s: setattr(rng.bit_generator, "state", s), reseed=lambda step: None)
    return model, optimizer, warmup_cosine(optimizer, 10, 2), hooks


def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path, monkeypatch):
    model, optimizer, scheduler, hooks = tiny_training()
    path = tmp_path / "last.pt"
    save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, sampler=hooks, step=1, best=0.5,
                    seconds=3.0)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as handle:  # half written, then the disk is full
            handle.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    saved = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, sampler=hooks, step=2,
                        best=0.4, seconds=4.0)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
    fresh, optimizer, scheduler, hooks = tiny_training()
    assert load_checkpoint(path, model=fresh, optimizer=optimizer, scheduler=scheduler, sampler=hooks) == (1, 0.5, 3.0)
    assert torch.equal(fresh.weight, saved)


def test_the_schedule_is_each_pipelines_old_one():
    """MRI: linear warm-up then cosine (its former _lr_at); EM: cosine without warm-up
    (its former _lr). The same values, the warm-up's at most one rounding apart."""
    lr, iterations, warmup = 2e-3, 120, 10

    def mri_lr(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, iterations - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def em_lr(step):
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, iterations))))

    for old, warm in ((mri_lr, warmup), (em_lr, 0)):
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        scheduler = warmup_cosine(optimizer, iterations, warm)
        for step in range(iterations + 5):
            used = optimizer.param_groups[0]["lr"]
            if step < warm:
                assert math.isclose(used, old(step), rel_tol=1e-15, abs_tol=0), step
            else:
                assert used == old(step), step
            optimizer.step()
            scheduler.step()


def test_the_log_has_one_header_and_resumes_at_the_checkpoint(tmp_path):
    log = CsvLog(tmp_path / "log.csv", ["iteration", "a"])
    log.start(None)
    for step in (5, 10, 15):
        log.append({"iteration": step, "a": step / 10, "unlisted": 0})
    log.start(10)  # resumed from a checkpoint at 10: the row of 15 is written again
    log.append({"iteration": 15, "a": 1.5})
    assert (tmp_path / "log.csv").read_text().splitlines() == ["iteration,a", "5,0.5", "10,1.0", "15,1.5"]
    log.start(None)  # a fresh run
    assert (tmp_path / "log.csv").read_text().splitlines() == ["iteration,a"]
    assert training.CHECKPOINT_FORMAT == 2
