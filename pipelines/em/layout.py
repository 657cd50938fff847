"""Where an EM run keeps things, and the settings every worker needs to rebuild a stage.

One output container holds the arrays (``affinities``, ``fragments``, ``segmentation``),
the region graph (``graph.sqlite``), daisy's per-block done markers (``.tracking/``) and
the run's settings (the ``psc`` attribute of the group), so a worker started anywhere
needs only the container's path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import zarr

AFFINITIES, FRAGMENTS, SEGMENTATION = "affinities", "fragments", "segmentation"
GRAPH_FILE = "graph.sqlite"
TRACKING_DIR = ".tracking"
DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class RunSettings:
    raw: str
    raw_name: str | None
    weights: str
    block_size: tuple[int, int, int] = (64, 64, 64)
    context: tuple[int, int, int] = (8, 8, 8)
    fragment_threshold: float = 0.5
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    threshold: float = 0.5
    device: str = "cpu"
    precision: str = "fp32"  # resolved by each worker on its own device (psc.pipelines.precision)
    threads_per_worker: int = 1
    weights_sha256: str = ""  # of the weights file when the run was prepared ("" for older runs)
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, out: str | Path) -> "RunSettings":
        data = dict(zarr.open_group(str(out), mode="r").attrs["psc"])
        if "amp" in data:  # runs prepared before --precision replaced --amp
            data["precision"] = "auto" if data.pop("amp") else "fp32"
        for key in ("block_size", "context", "thresholds"):
            data[key] = tuple(data[key])
        return cls(**data)

    def save(self, out: str | Path) -> None:
        zarr.open_group(str(out), mode="a").attrs["psc"] = asdict(self)


def default_output(raw: str | Path) -> Path:
    """Where a run of ``raw`` goes unless told: ``fib.zarr`` or ``fib.zarr/raw`` ->
    ``fib_psc.zarr`` beside the container, never inside it (psc-segment, psc-view and
    the napari plugin all name runs so)."""
    raw = Path(raw)
    container = next((p for p in (raw, *raw.parents) if p.name.endswith(".zarr")), raw)
    return container.with_name(container.name.removesuffix(".zarr") + "_psc.zarr")


def graph_path(out: str | Path) -> Path:
    return Path(out) / GRAPH_FILE


def tracking_path(out: str | Path, task_id: str) -> Path:
    return Path(out) / TRACKING_DIR / task_id
