"""``psc-segment``'s options for an EM volume (``RAW.zarr``), with their defaults: the
one place they are written (the command line's defaults and ``--help`` are built from
these fields; block size and thresholds are the run settings' own defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from psc.models.weights import ModelCard

from ..options import SegmentOptions, own_options
from .layout import DEFAULT_THRESHOLDS, RunSettings

FALLBACK_THRESHOLD = 0.5  # for weights whose card has no best validation threshold


@dataclass(frozen=True)
class EMRunOptions(SegmentOptions):
    workers: int = 1  # worker processes per stage; 0: every block in this process
    threshold: float | None = None  # of the written segmentation; None: threshold_for(card)
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS  # whose lookup tables are stored
    block_size: tuple[int, int, int] = RunSettings.block_size  # block (and chunk) shape in voxels
    gt: str | None = None  # ground-truth labels (zarr): score every threshold at the end
    worker_command: str | None = None  # start each worker with this shell command instead
    host: str | None = None  # the address workers connect to; None: detected
    spool: bool = False  # post workers under OUT.zarr/.workers/ for psc-worker --serve
    stage: tuple[str, ...] | None = None  # run only these stages; None: all
    graph: str | None = None  # the region graph's URL (graph_url.py); None: a resume's recorded one, else SQLite


EM_ONLY = own_options(EMRunOptions)  # options the MRI pipeline refuses


def threshold_for(card: ModelCard, threshold: float | None = None) -> float:
    """``threshold`` if given, else the weights' default: their card's
    ``default_threshold`` where one was chosen for transfer (the shipped EM model's, on
    the leave-one-volume-out rows of docs/results-em.md), else its best validation
    threshold (``val_best_threshold``), else ``FALLBACK_THRESHOLD``."""
    if threshold is not None:
        return float(threshold)
    metrics = card.metrics
    return float(metrics.get("default_threshold", metrics.get("val_best_threshold", FALLBACK_THRESHOLD)))
