"""Where an EM run keeps things, and the settings every worker needs to rebuild a stage.

One output container holds the images (``affinities``, ``fragments``, ``segmentation``),
the region graph (``graph.sqlite``), daisy's per-block done markers (``.tracking/``) and
the run's settings (the ``psc`` attribute of the root group), so a worker started
anywhere needs only the container's path.

The images are laid out as OME-Zarr 0.5 expects, so that OME-Zarr readers (ome-zarr-py,
napari-ome-zarr, neuroglancer) find all three, not only the first::

    OUT.zarr/                  root: attributes psc (RunSettings) and ome.multiscales
    |                          (the affinities image: datasets affinities/0, affinities/1 ...)
    |-- affinities/            the affinities image (its own ome.multiscales: 0, 1 ...)
    |   |-- 0                  level 0, (3, z, y, x) uint8; a downsampling stage adds 1..n
    |-- labels/                ome.labels = ["fragments", "segmentation"]
    |   |-- fragments/         label image: ome.multiscales + ome.image-label
    |   |   |-- 0              level 0, (z, y, x) uint64
    |   |-- segmentation/
    |       |-- 0
    |-- graph.sqlite, .tracking/, .logs/, qc.png, ...

The root is the affinities image because OME-Zarr nests a ``labels`` group inside the
image it annotates and readers start from the path they are given. Runs made before this
layout hold the three arrays flat at the root (``OUT.zarr/fragments``); psc still reads
and resumes them (``volumes.locate`` maps a name to whichever layout a run has).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import zarr

AFFINITIES, FRAGMENTS, SEGMENTATION = "affinities", "fragments", "segmentation"
LABELS_GROUP = "labels"  # OME-Zarr's group of label images, inside the image they annotate
# the image group of each of a run's images (its resolution levels are the arrays 0, 1 ...
# in it); the root's ome.multiscales describes ROOT_IMAGE, so readers given OUT.zarr see it
IMAGE_GROUPS = {AFFINITIES: AFFINITIES, FRAGMENTS: f"{LABELS_GROUP}/{FRAGMENTS}",
                SEGMENTATION: f"{LABELS_GROUP}/{SEGMENTATION}"}
LABEL_IMAGES = (FRAGMENTS, SEGMENTATION)
ROOT_IMAGE = AFFINITIES
GRAPH_FILE = "graph.sqlite"
TRACKING_DIR = ".tracking"
LOGS_DIR = ".logs"
SPOOL_DIR = ".workers"  # spool.SPOOL_DIR
QC_FILE = "qc.png"
# what a run writes beside the arrays its stages create (stages.STAGES[*].creates), and
# all that --force removes (run.clear_run); the lock file (lock.LOCK_FILE) stays
RUN_FILES = (GRAPH_FILE, GRAPH_FILE + "-wal", GRAPH_FILE + "-shm", GRAPH_FILE + "-journal", QC_FILE,
             TRACKING_DIR, LOGS_DIR, SPOOL_DIR)
DEFAULT_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class RunSettings:
    raw: str
    raw_name: str | None
    weights: str
    block_size: tuple[int, int, int] = (128, 128, 128)  # benchmarks/em.py --blocks, docs/benchmarks.md
    context: tuple[int, int, int] = (8, 8, 8)
    # the edges stage's context: waterz's merge scores near a block border come from
    # regions the context cuts off; with 8 voxels, 48^3 blocks over-merged at t = 0.7
    # (VI 0.96 against 0.74 in one block), with 24 they do not (0.75). docs/results-em.md
    edge_context: tuple[int, int, int] = (24, 24, 24)
    fragment_threshold: float = 0.5
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    threshold: float = 0.5
    device: str = "cpu"
    precision: str = "fp32"  # resolved by each worker on its own device (psc.pipelines.precision)
    threads_per_worker: int = 1
    weights_sha256: str = ""  # of the weights file when the run was prepared ("" for older runs)
    raw_fingerprint: dict = field(default_factory=dict)  # volumes.fingerprint of the raw ({} for older runs)
    raw_intensity: dict = field(default_factory=dict)  # intensity.measure: predict's input range ({}: older runs)
    warnings: list = field(default_factory=list)  # what the run found suspicious, also printed
    graph: str = ""  # the region graph's URL, no password (graph_url.py; "": OUT.zarr/graph.sqlite)
    extra: dict = field(default_factory=dict)

    @classmethod
    def load(cls, out: str | Path) -> "RunSettings":
        data = dict(zarr.open_group(str(out), mode="r").attrs["psc"])
        if "amp" in data:  # runs prepared before --precision replaced --amp
            data["precision"] = "auto" if data.pop("amp") else "fp32"
        data.setdefault("edge_context", data.get("context", cls.context))  # runs from before it: their context
        for key in ("block_size", "context", "edge_context", "thresholds"):
            data[key] = tuple(data[key])
        return cls(**data)

    def save(self, out: str | Path) -> None:
        zarr.open_group(str(out), mode="a").attrs["psc"] = asdict(self)


@dataclass(frozen=True)
class Rule:
    """What a run does when a setting differs from the one it was prepared with:
    ``fixed`` (refused: start over with --force or another -o), ``invalidates`` a stage
    (its done markers are dropped before it writes again), or neither (``why`` says why
    the output does not depend on it)."""

    fixed: bool = False
    invalidates: str | None = None
    why: str = ""


# The one table of the run's settings (a test checks that every RunSettings field is
# here, and docs/em.md "What a run guarantees" says the same).
SETTING_RULES: dict[str, Rule] = {
    "raw": Rule(fixed=True, why="predict reads it"),
    "raw_name": Rule(fixed=True, why="predict reads it"),
    "raw_fingerprint": Rule(fixed=True, why="the raw's content, re-converted at the same path"),
    "raw_intensity": Rule(fixed=True, why="predict's input range, measured from the raw's sampled chunks"),
    "weights": Rule(fixed=True, why="predict's network"),
    "weights_sha256": Rule(fixed=True, why="the weights' content, replaced at the same path"),
    "precision": Rule(fixed=True, why="predict's arithmetic: fp32, bf16 and fp16 affinities differ"),
    "device": Rule(fixed=True, why="predict's arithmetic (and what precision auto resolves to)"),
    "block_size": Rule(fixed=True, why="the block grid, the chunks and the fragment ids"),
    "context": Rule(fixed=True, why="fragments see it"),
    "edge_context": Rule(fixed=True, why="edges see it (a run from before it keeps its context)"),
    "fragment_threshold": Rule(fixed=True, why="fragments' watershed"),
    "threshold": Rule(invalidates="relabel", why="the lookup table relabel applies"),
    "thresholds": Rule(why="merge recomputes every table on every run; a table does not depend on the others"),
    "threads_per_worker": Rule(why="only how many threads a worker uses (follows --workers)"),
    "graph": Rule(fixed=True, why="the region graph holds the fragments and edges the done blocks wrote "
                  "(--graph on a resume may be left out: the recorded URL is used)"),
    "extra": Rule(why="the run's own bookkeeping (what each stage's done markers were made with)"),
    "warnings": Rule(why="a record of what the run found suspicious (the raw's intensities, a single segment)"),
}


def fixed_settings() -> tuple[str, ...]:
    return tuple(name for name, rule in SETTING_RULES.items() if rule.fixed)


def invalidating(stage: str) -> tuple[str, ...]:
    """The settings whose change drops ``stage``'s done markers."""
    return tuple(name for name, rule in SETTING_RULES.items() if rule.invalidates == stage)


def default_output(raw: str | Path) -> Path:
    """Where a run of ``raw`` goes unless told: ``fib.zarr`` or ``fib.zarr/raw`` ->
    ``fib_psc.zarr`` beside the container, never inside it (psc-segment, psc-view and
    the napari plugin all name runs so)."""
    raw = Path(raw)
    container = next((p for p in (raw, *raw.parents) if p.name.endswith(".zarr")), raw)
    return container.with_name(container.name.removesuffix(".zarr") + "_psc.zarr")


def image_group(name: str) -> str:
    """The group (relative to OUT.zarr) of the run's image ``name``: ``IMAGE_GROUPS``'s,
    and for an array a newly declared stage creates (``stages.Array``), a group of that
    name at the root (an image, not a label image, until it is added to the table)."""
    if not name or "/" in name or name in (LABELS_GROUP, ".", ".."):
        raise ValueError(f"{name!r} cannot name a run's image")
    return IMAGE_GROUPS.get(name, name)


def level_path(name: str, level: int = 0) -> str:
    """The array of resolution level ``level`` of the run's image ``name``, relative to
    OUT.zarr (``labels/segmentation/0``). Level 0 is full resolution; the levels of an
    image are its group's arrays ``0, 1, ...`` with no gap. Paths only: which layout a
    given run uses is ``volumes.locate``'s business."""
    if int(level) < 0:
        raise ValueError(f"level {level}: levels count from 0 (full resolution)")
    return f"{image_group(name)}/{int(level)}"


def graph_path(out: str | Path) -> Path:
    return Path(out) / GRAPH_FILE


def tracking_path(out: str | Path, task_id: str) -> Path:
    return Path(out) / TRACKING_DIR / task_id
