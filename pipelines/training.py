"""The training scaffold that MRI and EM training share.

Both pipelines train the same way around their own data, loss and validation: a
learning-rate schedule, a CSV log, a curve plot, ``best.pt`` when the validation score
improves, ``last.pt`` to resume from, and the weights with their model card at the end.
Kept in one place so that the two cannot drift apart again, and so that ``--resume``
is exact: ``last.pt`` holds everything the next iteration depends on (model,
optimiser, scheduler, the torch/python/numpy random states and the patch sampler's own
random state), so a run interrupted after any checkpoint and resumed computes the same
weights and log (apart from the seconds column) as an uninterrupted one.

A pipeline builds its model, optimiser (``warmup_cosine`` for the schedule) and
sampler, wraps them in a ``Run`` and calls ``Run.start`` and ``Run.fit`` with a
function for one optimisation step and one for validation.
"""

from __future__ import annotations

import csv
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from tqdm import tqdm

from psc.models.weights import ModelCard, save_weights
from psc.utils.files import atomic_write

# last.pt of the earlier, separate MRI and EM loops held neither the scheduler nor the
# sampler state (nor, for EM, any random state): such a run resumes, but not exactly.
CHECKPOINT_FORMAT = 2


def warmup_cosine(optimizer: torch.optim.Optimizer, iterations: int, warmup: int = 0) -> LambdaLR:
    """Linear warm-up over ``warmup`` iterations, then cosine decay to 0 at
    ``iterations``: the lr of step ``s`` (counting from 0) is ``lr * factor(s)``. The
    factor is a plain function, so the scheduler's state holds only the step count and
    a resumed run with more ``iterations`` follows the new cosine, as before. The values
    are the former loops' (MRI: warm-up + cosine, EM: ``warmup=0``); a warm-up value may
    differ from the former ``lr * (s + 1) / warmup`` in its last bit (rounding order)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, iterations - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def _sync_lr(scheduler: LambdaLR) -> None:
    """Set the optimiser's lr to the schedule's value at the scheduler's step (after
    a resume the loaded optimiser holds the lr of the schedule it was saved under)."""
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


@dataclass(frozen=True)
class Panel:
    """One plot of ``curves.png``: log ``columns`` (column -> legend label) over iteration."""

    columns: dict[str, str]
    ylabel: str = ""
    ylim: tuple[float, float] | None = None


def plot_curves(log: Path, png: Path, panels: Sequence[Panel]) -> None:
    """Draw ``panels`` side by side from the CSV ``log`` into ``png``, on a bare
    ``Figure``: neither pyplot nor ``matplotlib.use``, which would change the
    process's backend under a napari (Qt) user training from the same interpreter."""
    rows = list(csv.DictReader(Path(log).open()))
    if not rows:
        return
    iteration = [int(r["iteration"]) for r in rows]
    fig = Figure(figsize=(5 * len(panels), 4), layout="tight")
    for ax, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for column, label in panel.columns.items():
            ax.plot(iteration, [float(r[column] or "nan") for r in rows], label=label)  # "": not measured
        ax.set_xlabel("iteration")
        if panel.ylabel:
            ax.set_ylabel(panel.ylabel)
        if panel.ylim:
            ax.set_ylim(*panel.ylim)
        ax.legend()
    atomic_write(png, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


class CsvLog:
    """``log.csv``: a header once, then a row per validation."""

    def __init__(self, path: Path, columns: Sequence[str]) -> None:
        self.path, self.columns = Path(path), list(columns)

    def start(self, step: int | None) -> None:
        """A fresh run (``step`` None) removes the old log. A resumed one keeps the rows
        up to its checkpoint's ``step``: rows written after it (by a run that stopped
        before its next checkpoint) are dropped, the resumed run writes them again."""
        kept = []
        if step is not None and self.path.exists():
            rows = self.rows()
            kept = [r for r in rows if int(r["iteration"]) <= step]
            if len(kept) == len(rows):
                return

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(self.columns)
                writer.writerows([r[c] for c in self.columns] for r in kept)

        atomic_write(self.path, write)

    def append(self, row: dict) -> None:
        """Append the values of ``row`` for the log's columns (other keys are ignored)."""
        with self.path.open("a", newline="") as handle:
            csv.writer(handle).writerow([row[c] for c in self.columns])

    def rows(self) -> list[dict]:
        return list(csv.DictReader(self.path.open()))


@dataclass
class SamplerHooks:
    """How the scaffold saves and restores a pipeline's patch sampler: ``state()``
    returns a picklable snapshot of its random state and ``restore(snapshot)`` puts it
    back; ``reseed(step)`` is what the old loops did on resume (seed + step), used only
    for their checkpoints, which hold no snapshot."""

    state: Callable[[], Any]
    restore: Callable[[Any], None]
    reseed: Callable[[int], None]


def save_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                    sampler: SamplerHooks, step: int, best: float, seconds: float) -> None:
    """Write everything a resume needs to ``path`` atomically (temporary file, then
    rename): a crash or full disk during the save leaves the previous checkpoint."""
    state = {
        "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "sampler": sampler.state(), "step": step, "best": best,
        "seconds": seconds, "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                    sampler: SamplerHooks) -> tuple[int, float, float]:
    """Restore what ``save_checkpoint`` wrote; returns ``(step, best, seconds)``.

    A ``last.pt`` of the earlier loops (no scheduler or sampler state) still resumes:
    the schedule continues at its step and the sampler is reseeded as those loops did,
    so the run goes on but no longer equals an uninterrupted one (a warning says so)."""
    # not weights_only: the random states are numpy arrays and tuples; last.pt is the
    # run's own file, never a download
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    step = int(state["step"])
    exact = "scheduler" in state and "sampler" in state
    if exact:
        scheduler.load_state_dict(state["scheduler"])
    else:
        scheduler.last_epoch = step
    _sync_lr(scheduler)
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        np.random.set_state(state["numpy_rng"])
    if exact:
        sampler.restore(state["sampler"])
    else:
        sampler.reseed(step)
        print(f"warning: {path} was written by an older psc-train without the sampler and scheduler state; "
              "resuming with the sampler reseeded, so the run will not equal an uninterrupted one", flush=True)
    return step, float(state["best"]), float(state.get("seconds", 0.0))


class Run:
    """One training run in its folder ``out``.

    ``columns``: the log's columns, starting with ``iteration`` and ``train_loss`` and
    ending with ``seconds``; ``lr`` (the last step's learning rate) is filled in if
    listed, the others come from the validation function. ``panels``: the plots of
    ``curves.png``. ``higher_is_better``: the validation score's direction (Dice:
    higher, VI: lower). ``on_best(step)``: called after ``best.pt`` is written, for a
    pipeline's own record of the best validation (EM's ``best.json``).
    """

    def __init__(self, out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
                 sampler: SamplerHooks, *, columns: Sequence[str], panels: Sequence[Panel], higher_is_better: bool,
                 score_name: str, on_best: Callable[[int], None] | None = None) -> None:
        self.out = Path(out)
        self.model, self.optimizer, self.scheduler, self.sampler = model, optimizer, scheduler, sampler
        self.log = CsvLog(self.out / "log.csv", columns)
        self.panels, self.higher_is_better, self.score_name, self.on_best = panels, higher_is_better, score_name, on_best
        self.step, self.seconds = 0, 0.0
        self.best = -math.inf if higher_is_better else math.inf

    def start(self, resume: bool) -> None:
        """Resume from ``last.pt`` if asked and there is one; otherwise start afresh,
        removing the old log and ``last.pt`` (a later resume must not continue an
        older run)."""
        last = self.out / "last.pt"
        if resume and last.is_file():
            self.step, self.best, self.seconds = load_checkpoint(
                last, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler, sampler=self.sampler)
            print(f"resumed at iteration {self.step} (best {self.score_name} {self.best:.4f})", flush=True)
            self.log.start(self.step)
        else:
            last.unlink(missing_ok=True)
            self.log.start(None)

    def fit(self, iterations: int, val_every: int, train_step: Callable[[], float],
            evaluate: Callable[[int], tuple[float, dict]], *, stop_after: int | None = None,
            desc: str = "train") -> bool:
        """Train up to ``iterations``. ``train_step()`` does one optimisation step and
        returns its loss; the scheduler is stepped after it. Every ``val_every``
        iterations and at the end, ``evaluate(step)`` returns ``(score, log values)``;
        then a log row, ``best.pt`` if the score improved, ``last.pt`` and the plot.

        ``stop_after``: return right after the first checkpoint at or after this
        iteration, as if the run had been killed there (tests of resume). Returns
        whether the run reached ``iterations``."""
        losses: list[float] = []
        started = time.time()
        bar = tqdm(total=iterations, initial=self.step, desc=desc, file=sys.stdout, mininterval=30)
        try:
            while self.step < iterations:
                lr = self.optimizer.param_groups[0]["lr"]
                losses.append(float(train_step()))
                self.scheduler.step()
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
                if self.step % val_every and self.step != iterations:
                    continue
                score, values = evaluate(self.step)
                row = {"iteration": self.step, "train_loss": f"{np.mean(losses):.4f}", "lr": f"{lr:.2e}", **values,
                       "seconds": f"{self.seconds + time.time() - started:.0f}"}
                self.log.append(row)
                losses = []
                shown = (f"{c} {row[c]}" for c in self.log.columns if c not in ("iteration", "seconds"))
                bar.write(f"iteration {self.step}: " + ", ".join(shown))
                self._checkpoint(score, self.seconds + time.time() - started)
                plot_curves(self.log.path, self.out / "curves.png", self.panels)
                if stop_after is not None and self.step >= stop_after:
                    return False
        finally:
            bar.close()
        return True

    def _checkpoint(self, score: float, seconds: float) -> None:
        improved = score > self.best if self.higher_is_better else score < self.best
        if improved:
            self.best = score
            weights = self.model.state_dict()
            atomic_write(self.out / "best.pt", lambda tmp: torch.save(weights, tmp))
            if self.on_best is not None:
                self.on_best(self.step)
        save_checkpoint(self.out / "last.pt", model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                        sampler=self.sampler, step=self.step, best=self.best, seconds=seconds)

    def export(self, card: ModelCard, path: str | Path, *, weights: str = "best") -> ModelCard:
        """The best weights (``best.pt``, loaded into the model), or with ``weights="last"``
        the model as the run ended (a run without validation data has no best), with
        ``card``, the pipeline's description of them, written by ``save_weights``."""
        if weights not in ("best", "last"):
            raise ValueError(f"weights must be 'best' or 'last', not {weights!r}")
        if weights == "best":
            self.model.load_state_dict(torch.load(self.out / "best.pt", weights_only=True))
        card = save_weights(self.model, card, path)
        print(f"exported {path}", flush=True)
        return card
