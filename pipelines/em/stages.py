"""The stages of an EM run, each declared once, and the one ordered table of them.

A stage declares (after funkelab/volara's ``BlockwiseTask``):

- ``name`` (its daisy task id and ``--stage`` choice) and ``description`` (one line,
  for ``psc-segment --help`` and the stage table in docs/em.md);
- ``blockwise``: a daisy task over the block grid, or one call on the whole run;
- ``with_context``: whether its read region reaches past its write region on each side by the
  run setting ``context_setting`` names (``context``; ``edge_context`` for edges);
  ``context(settings)`` gives the voxels (none without context);
- ``creates``: the arrays it writes, which :func:`psc.pipelines.em.run.prepare` creates;
- ``chains_after``: the stage whose blocks its blocks wait for when every stage runs
  (predict -> fragments -> edges is one daisy pipeline with block dependencies);
- ``open_worker(worker)``: a context manager that opens what one worker needs once (the
  network, the arrays, the graph connection, the lookup table) and yields the per-block
  function ``process(read_roi, write_roi)``;
- ``drop_artifacts(out, settings)``: what to forget before it runs because its inputs
  changed, and ``finished(out, settings)``: what to record once all its blocks are done;
- ``run(out, settings)`` (non-blockwise stages): the stage itself.

:data:`STAGES` lists them in run order; ``STAGE_NAMES``, the run loop, the ``--stage``
choices, the napari widget and ``psc-worker`` all come from it, so a new stage is one
class here plus one entry in the table.

daisy ships a block function to each worker process once and calls it per block:
:class:`BlockFunction` pickles as the stage and the output path only and enters the
stage's ``open_worker`` on the first block inside the worker, so a model is loaded once
per worker, not once per block. Every stage reads its *read* region and writes only its
*write* region (daisy's contract), and a block that is run twice writes the same result.
"""

from __future__ import annotations

import os
import shutil
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Iterator

from funlib.geometry import Coordinate, Roi

from . import layout

BlockProcess = Callable[[Roi, Roi], None]  # process(read_roi, write_roi), read_roi clipped to the volume


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def worker_id() -> int:
    """This worker's number from daisy's context (0 outside a distributed run)."""
    if "DAISY_CONTEXT" not in os.environ:
        return 0
    import daisy

    return int(daisy.Context.from_env()["worker_id"])


@dataclass(frozen=True)
class Array:
    """An array a stage writes into OUT.zarr (``channels`` 0: a plain (z, y, x) array)."""

    name: str
    dtype: str
    channels: int = 0


@dataclass(frozen=True)
class Worker:
    """What every stage's worker knows: the run, its settings, and the block grid."""

    out: str
    settings: layout.RunSettings
    volume_roi: Roi
    block_shape: Coordinate
    grid_shape: tuple[int, ...]

    @classmethod
    def open(cls, out: str) -> "Worker":
        import torch

        from .volumes import open_volume

        settings = layout.RunSettings.load(out)
        torch.set_num_threads(max(1, settings.threads_per_worker))
        volume = open_volume(out, layout.FRAGMENTS)
        block_shape = Coordinate(settings.block_size)
        grid_shape = tuple(-(-s // b) for s, b in zip(volume.shape, block_shape))
        return cls(out, settings, volume.roi, block_shape, grid_shape)

    def block_index(self, roi: Roi) -> int:
        """The linear index of the block whose write region starts at ``roi``'s offset."""
        from .fragments import block_index

        return block_index(roi.offset, self.block_shape, self.grid_shape)


class Stage:
    """The declaration every stage fills in (see the module's docstring)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    blockwise: ClassVar[bool] = True
    creates: ClassVar[tuple[Array, ...]] = ()
    with_context: ClassVar[bool] = False
    context_setting: ClassVar[str] = "context"  # the RunSettings field that says how much
    chains_after: ClassVar[str | None] = None

    def context(self, settings: layout.RunSettings) -> Coordinate:
        return Coordinate(getattr(settings, self.context_setting) if self.with_context else (0, 0, 0))

    def invalidating(self) -> tuple[str, ...]:
        """The settings whose change drops this stage's done markers (``layout.SETTING_RULES``;
        a stage that derives its output from another's also follows that one's)."""
        return layout.invalidating(self.name)

    def prepare_arrays(self, group, settings: layout.RunSettings, shape, voxel_size, offset) -> None:
        """Create arrays beyond ``creates`` whose number or geometry depend on the run (the
        resolution levels): :func:`psc.pipelines.em.run.prepare` calls it once the declared
        arrays exist. Default: nothing."""

    @contextmanager
    def open_worker(self, worker: Worker) -> Iterator[BlockProcess]:
        raise NotImplementedError(f"{self.name} is not a blockwise stage")
        yield  # pragma: no cover

    def drop_artifacts(self, out: str, settings: layout.RunSettings) -> None:
        """Forget what is stale before the stage runs. Default: the settings that
        invalidate this stage (``layout.SETTING_RULES``) are compared with those its done
        markers were made with (``extra["made_with"][name]``); if they differ the markers
        are dropped, and then the current ones are recorded (saved) *before* any block
        runs, so every marker ever present was made with the recorded settings: an
        interrupted stage resumed with other settings redoes every block."""
        keys = self.invalidating()
        if not keys:
            return
        now = {key: _plain(getattr(settings, key)) for key in keys}
        made_with = dict(settings.extra.get("made_with") or {})
        before = made_with.get(self.name)
        if before is None:
            before = self.legacy_made_with(settings)
        if before is not None and before != now:
            shutil.rmtree(layout.tracking_path(out, self.name), ignore_errors=True)
        if made_with.get(self.name) != now:
            made_with[self.name] = now
            settings.extra["made_with"] = made_with
            settings.save(out)  # atomic (zarr writes zarr.json beside, then renames)

    def legacy_made_with(self, settings: layout.RunSettings) -> dict | None:
        """For runs prepared before ``made_with``: what the markers were made with, if known."""
        return None

    def is_done(self, out: str, settings: layout.RunSettings) -> bool:
        """Whether this stage's output is complete for ``settings``: what a stage run on
        its own (``--stage``) reads from the stages before it. A blockwise stage is done
        when daisy has set as many done markers as the run has blocks
        (``.tracking/<name>/done``, a uint8 per cell of daisy's own grid, which with
        context is larger than the block grid: its other cells stay 0) and the markers
        were made with the current values of the settings that invalidate it (``made_with``)."""
        import numpy as np
        import zarr

        from .volumes import open_volume

        keys = self.invalidating()
        if keys:
            made_with = (settings.extra.get("made_with") or {}).get(self.name)
            if made_with is not None and made_with != {key: _plain(getattr(settings, key)) for key in keys}:
                return False
        markers = layout.tracking_path(out, self.name) / "done"
        if not markers.is_dir():
            return False
        try:
            done = zarr.open_array(str(markers), mode="r")[...]
            shape = open_volume(out, layout.FRAGMENTS).shape
        except Exception:  # unreadable markers are not done: the stage redoes its blocks
            return False
        blocks = int(np.prod([-(-s // b) for s, b in zip(shape, settings.block_size)]))
        return int(np.count_nonzero(done == 1)) >= blocks

    def finished(self, out: str, settings: layout.RunSettings) -> None:
        """Record what the next run needs once every block is done (default: nothing)."""

    def run(self, out: str, settings: layout.RunSettings) -> dict:
        """A non-blockwise stage's work; returns entries for :func:`run`'s result."""
        raise NotImplementedError(f"{self.name} is a blockwise stage")

    def block_function(self, out: str | Path) -> "BlockFunction":
        return BlockFunction(self, out)

    def __repr__(self) -> str:
        return f"<stage {self.name}>"


class Predict(Stage):
    name = "predict"
    description = "affinities from the U-Net, block by block, the model loaded once per worker"
    creates = (Array(layout.AFFINITIES, "uint8", channels=3),)

    @contextmanager
    def open_worker(self, worker: Worker) -> Iterator[BlockProcess]:
        import torch

        from .affinities import to_uint8
        from .predict import AffinityPredictor
        from .volumes import open_volume

        settings = worker.settings
        device = settings.device
        if device == "auto":  # left to the worker (remote workers): its own GPU if it has one
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and ":" not in device and torch.cuda.is_available():
            device = f"cuda:{worker_id() % torch.cuda.device_count()}"  # one GPU per worker
        # intensity.measure, at prepare ({} for older runs: the dtype's range)
        predictor = AffinityPredictor(settings.weights, device=device, precision=settings.precision,
                                      intensity=settings.raw_intensity)
        raw = open_volume(settings.raw, settings.raw_name)
        affinities = open_volume(worker.out, layout.AFFINITIES, mode="r+")

        def process(read_roi: Roi, write_roi: Roi) -> None:
            affinities.write(write_roi, to_uint8(predictor.predict(raw, write_roi)))

        yield process


class Fragments(Stage):
    name = "fragments"
    description = "seeded watershed of the affinities with context, ids unique across the volume"
    creates = (Array(layout.FRAGMENTS, "uint64"),)
    with_context = True
    chains_after = "predict"

    @contextmanager
    def open_worker(self, worker: Worker) -> Iterator[BlockProcess]:
        from .affinities import from_uint8
        from .fragments import globalise, watershed_fragments
        from .graph_url import open_run_graph
        from .volumes import open_volume

        affinities = open_volume(worker.out, layout.AFFINITIES)
        fragments = open_volume(worker.out, layout.FRAGMENTS, mode="r+")
        graph = open_run_graph(worker.out, worker.settings)
        threshold = worker.settings.fragment_threshold

        def process(read_roi: Roi, write_roi: Roi) -> None:
            found = watershed_fragments(from_uint8(affinities.read(read_roi)), threshold)
            crop = (write_roi - read_roi.offset).to_slices()
            index = worker.block_index(write_roi)
            labelled, ids, sizes = globalise(found[crop], index)
            fragments.write(write_roi, labelled)
            graph.write_fragments(index, ids, sizes)

        try:
            yield process
        finally:
            graph.close()


class Edges(Stage):
    name = "edges"
    description = "waterz merge score of every edge between fragments, with context"
    with_context = True
    chains_after = "fragments"
    # more than fragments read: its merge scores depend on whole regions (layout.py)
    context_setting = "edge_context"

    @contextmanager
    def open_worker(self, worker: Worker) -> Iterator[BlockProcess]:
        from .affinities import from_uint8
        from .agglomerate import score_edges
        from .fragments import fragment_block
        from .graph_url import open_run_graph
        from .volumes import open_volume

        affinities = open_volume(worker.out, layout.AFFINITIES)
        fragments = open_volume(worker.out, layout.FRAGMENTS)
        graph = open_run_graph(worker.out, worker.settings)

        def process(read_roi: Roi, write_roi: Roi) -> None:
            index = worker.block_index(write_roi)
            scored = score_edges(from_uint8(affinities.read(read_roi)), fragments.read(read_roi))
            graph.write_edges(index, [e for e in scored if fragment_block(e[0]) == index])  # its lower fragment's

        try:
            yield process
        finally:
            graph.close()


class Merge(Stage):
    name = "merge"
    description = "a fragment -> segment lookup table per threshold, from the whole graph"
    blockwise = False

    def run(self, out: str, settings: layout.RunSettings) -> dict:
        from .graph_url import open_run_graph
        from .merge import write_lookup_tables

        graph = open_run_graph(out, settings)
        try:
            return {"segments": write_lookup_tables(graph, settings.thresholds)}
        finally:
            graph.close()

    def is_done(self, out: str, settings: layout.RunSettings) -> bool:
        """Done when the graph holds a lookup table at every threshold of the run (relabel
        applies the one at ``threshold``; a table missing is a merge that never ran, or
        ran before ``--threshold`` or ``--thresholds`` changed)."""
        from .graph_url import has_graph, open_run_graph

        if not has_graph(settings.graph, out):
            return False  # opening would create it
        graph = open_run_graph(out, settings)
        try:
            stored = set(graph.thresholds())
        finally:
            graph.close()
        return bool(stored) and {float(t) for t in settings.thresholds} <= {float(t) for t in stored}


class Relabel(Stage):
    name = "relabel"
    description = "segmentation = lookup[fragments] at --threshold, block by block"
    creates = (Array(layout.SEGMENTATION, "uint64"),)

    @contextmanager
    def open_worker(self, worker: Worker) -> Iterator[BlockProcess]:
        from .graph import apply_lookup
        from .graph_url import open_run_graph
        from .volumes import open_volume

        fragments = open_volume(worker.out, layout.FRAGMENTS)
        segmentation = open_volume(worker.out, layout.SEGMENTATION, mode="r+")
        graph = open_run_graph(worker.out, worker.settings)
        try:
            ids, segments = graph.lookup(worker.settings.threshold)
        finally:
            graph.close()

        def process(read_roi: Roi, write_roi: Roi) -> None:
            segmentation.write(write_roi, apply_lookup(fragments.read(write_roi), ids, segments))

        yield process

    def legacy_made_with(self, settings: layout.RunSettings) -> dict | None:
        """Older runs recorded the threshold only once relabel had finished
        (``relabelled_at``); none recorded: the markers are kept, as those runs did."""
        if "relabelled_at" in settings.extra:
            return {"threshold": float(settings.extra["relabelled_at"])}
        return {"threshold": float(settings.threshold)}

    def finished(self, out: str, settings: layout.RunSettings) -> None:
        """``relabelled_at``: the threshold of a complete segmentation (what the napari
        widget shows); the markers' own record is ``made_with``, written before."""
        settings.extra["relabelled_at"] = settings.threshold
        settings.save(out)


class Downsample(Stage):
    """Levels 1..L of the affinities, fragments and segmentation images (``downsample.py``:
    2x2x2 rounded mean for the affinities, mode for the labels), so a large run opens
    zoomed out at once in napari and neuroglancer.

    Each block of the level-0 grid reads its own write region of level 0 (no context:
    the 2x2x2 cells of every level nest inside a block, which is a multiple of 2^L) and
    writes its region of every level; level k's chunks are ``block / 2^k``, so each block
    writes whole chunks and no two blocks write one. L is ``downsample.level_count``
    (halvings while a chunk stays >= 16 voxels per axis), fixed at prepare, where the
    level arrays are created (``prepare_arrays``); a worker writes the levels it finds.
    Chained after relabel: a block starts once relabel's block under it is done. The
    segmentation's levels come from relabel's output, so a new ``threshold`` drops
    these markers as it drops relabel's. A run in the flat layout of older psc gets no
    levels (and the stage has nothing to write)."""

    name = "downsample"
    description = "levels 1..L of every image (2x2x2 mean for affinities, mode for labels), block by block"
    chains_after = "relabel"
    images = (layout.AFFINITIES, layout.FRAGMENTS, layout.SEGMENTATION)

    def invalidating(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(layout.invalidating("relabel") + layout.invalidating(self.name)))

    def prepare_arrays(self, group, settings: layout.RunSettings, shape, voxel_size, offset) -> None:
        from . import downsample
        from .volumes import create_run_volume, is_flat_run, open_volume

        if is_flat_run(group):
            return
        count = downsample.level_count(settings.block_size, shape, downsample.MIN_CHUNK)
        for name in self.images:
            base = open_volume(group, name)
            size, origin = list(map(float, voxel_size)), list(map(float, offset))
            for level in range(1, count + 1):
                # OME-Zarr / napari / neuroglancer place a voxel by its centre: a level's
                # voxel 0 is the centre of the 2x2x2 cell of voxels 0..1 above it
                origin = [o + v / 2 for o, v in zip(origin, size)]
                size = [v * 2 for v in size]
                chunks = [b // 2 ** level for b in settings.block_size]
                create_run_volume(group, name, downsample.level_shape(shape, level), base.array.dtype,
                                  chunks=chunks, voxel_size=size, offset=origin, channels=base.channels,
                                  level=level)

    @contextmanager
    def open_worker(self, worker: Worker) -> Iterator[BlockProcess]:
        from .downsample import downsample
        from .volumes import levels, open_container, open_volume

        group = open_container(worker.out, mode="r+")
        pyramids = []
        for name in self.images:
            count = len(levels(group, name))
            pyramids.append((name in layout.LABEL_IMAGES,
                             [open_volume(group, name, mode="r+", level=level) for level in range(count)]))

        def process(read_roi: Roi, write_roi: Roi) -> None:
            for labels, volumes in pyramids:
                if len(volumes) < 2:
                    continue
                data = volumes[0].read(write_roi)
                for level, volume in enumerate(volumes[1:], start=1):
                    data = downsample(data, labels)
                    region = Roi(tuple(o // 2 ** level for o in write_roi.offset), data.shape[-3:])
                    volume.write(region, data)

        yield process


STAGES: tuple[Stage, ...] = (Predict(), Fragments(), Edges(), Merge(), Relabel(), Downsample())
STAGE_NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)


def stage_named(name: str) -> Stage | None:
    """The declared stage called ``name`` (a daisy task id), or None."""
    return next((stage for stage in STAGES if stage.name == name), None)


def stages_not_done(out: str | Path, stages: tuple[str, ...], settings: layout.RunSettings | None) -> list[str]:
    """The stages a run of only ``stages`` (``--stage``) needs and that are not done: every
    stage before the last chosen one that is not chosen itself (``Stage.is_done``).

    A stage run on its own reads its inputs without knowing whether anything wrote them:
    ``--stage relabel`` on a fresh output failed in every block with a traceback
    (``KeyError: no lookup table``), and ``--stage fragments`` watershedded an affinity
    array of zeros and exited 0. ``settings`` None: the run has not been prepared yet
    (a fresh output, or one ``--force`` clears), so nothing before is done."""
    chosen = [stage for stage in STAGES if stage.name in stages]
    if not chosen:
        return []
    last = STAGES.index(chosen[-1])
    needed = [stage for stage in STAGES[:last] if stage.name not in stages]
    if settings is None:
        return [stage.name for stage in needed]
    return [stage.name for stage in needed if not stage.is_done(str(out), settings)]


def stage_table() -> str:
    """The stage table of docs/em.md, from the declarations (a test keeps the doc in step)."""
    rows = ["| stage | kind | context | creates | what |", "|---|---|---|---|---|"]
    for stage in STAGES:
        kind = "blockwise" if stage.blockwise else "global"
        context = f"the run's `{stage.context_setting}`" if stage.with_context else "none"
        creates = ", ".join(f"`{array.name}`" for array in stage.creates) or "-"
        after = f" (chained after {stage.chains_after})" if stage.chains_after else ""
        rows.append(f"| `{stage.name}` | {kind}{after} | {context} | {creates} | {stage.description} |")
    return "\n".join(rows)


def check_declarations(stages: tuple[Stage, ...] = STAGES) -> None:
    """Names unique and described; a chained stage is blockwise and follows the stage it
    chains after; a blockwise stage has an ``open_worker``, a global one a ``run``."""
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"stage names must be unique and not empty: {names}")
    for index, stage in enumerate(stages):
        if not stage.description or any(c in stage.description for c in "\n;|"):
            raise ValueError(f"{stage.name}: needs a one-line description (no ';' or '|': lists and tables)")
        kind = "open_worker" if stage.blockwise else "run"
        if getattr(type(stage), kind) is getattr(Stage, kind):
            raise ValueError(f"{stage.name}: a {'blockwise' if stage.blockwise else 'global'} stage declares {kind}")
        if stage.chains_after is not None:
            before = stages[index - 1] if index else None
            if not (stage.blockwise and before is not None and before.blockwise and before.name == stage.chains_after):
                raise ValueError(f"{stage.name}: chains after {stage.chains_after!r}, which must be the blockwise "
                                 "stage just before it")


check_declarations()


class BlockFunction:
    """The block function daisy calls, picklable: it carries the stage and the output path
    only, and builds the worker's state (the stage's ``open_worker``) on the first block
    inside the worker. A setup that fails fails that block, and the next block tries again.
    """

    def __init__(self, stage: Stage, out: str | Path) -> None:
        self.stage, self.out = stage, str(out)
        self._stack: ExitStack | None = None
        self._process: BlockProcess | None = None
        self._volume_roi: Roi | None = None

    def __getstate__(self):
        return {"stage": self.stage, "out": self.out, "_stack": None, "_process": None, "_volume_roi": None}

    def __call__(self, block) -> None:
        if self._process is None:
            with ExitStack() as stack:
                worker = Worker.open(self.out)
                process = stack.enter_context(self.stage.open_worker(worker))
                self._stack, self._process, self._volume_roi = stack.pop_all(), process, worker.volume_roi
        self._process(block.read_roi.intersect(self._volume_roi), block.write_roi)

    def close(self) -> None:
        """Close what the worker opened (the graph connection); the next block reopens."""
        stack, self._stack, self._process = self._stack, None, None
        if stack is not None:
            stack.close()


class SchedulerLost(ConnectionError):
    """The connection to the daisy scheduler broke while this worker was serving it (the
    scheduler was killed, or its host vanished): there is nobody left to take blocks
    from or to report them to, so the worker must stop instead of retrying."""


def serve(function: BlockFunction) -> None:
    """Take blocks from the scheduler until none are left.

    A block that raises is reported to daisy as failed (daisy's ``acquire_block``
    context does that, with the traceback) and the worker goes on with the next block:
    daisy retries the failed block up to the task's ``max_retries`` and then counts it as
    failed, instead of restarting crashed workers until the whole task is abandoned.

    Only the block's *own* error is survived that way. An error from daisy's client
    itself (asking for a block, releasing it, reporting its failure: daisy raises the
    socket's ``OSError``, e.g. ``BrokenPipeError``, once the scheduler's TCP stream is
    gone) means the scheduler died (SIGKILL, SIGTERM, a lost host). Retrying that is a
    busy loop that never ends, each turn failing at once and logging a line: the
    worker spun a core and wrote megabytes a second into ``.logs/`` for ever. It raises
    :class:`SchedulerLost` instead, after one log line, and the process exits. A block
    still being computed when the scheduler dies is finished first (it is only a few
    seconds) and its release is what fails; its done marker is never written, so the
    resumed run redoes it. A scheduler that dies while the worker waits for its next
    block is not an error to daisy's client: it answers "no block" over the closed
    stream, exactly as at the normal end of a task (where the client disconnects
    first too, so ``client.connected`` cannot tell the two apart), and the worker
    leaves at once without a log line; either way it exits.
    """
    import logging

    import daisy

    log = logging.getLogger(__name__)
    client = daisy.Client()
    try:
        while True:
            failed_block: list[BaseException] = []
            try:
                with client.acquire_block() as block:
                    if block is None:
                        return
                    try:
                        function(block)
                    except Exception as error:
                        failed_block.append(error)
                        raise
            except Exception as error:
                if failed_block and error is failed_block[0] and client.connected:
                    # the block's own error, already reported to the scheduler by acquire_block
                    log.warning("block failed: %s", error)
                    continue
                reason = getattr(error, "strerror", None) or str(error) or type(error).__name__
                log.warning("lost the scheduler at %s:%s (%s): this worker exits", client.host, client.port, reason)
                raise SchedulerLost(f"lost the scheduler at {client.host}:{client.port} ({reason})") from error
    finally:
        function.close()


class StageWorker:
    """A daisy worker function (one per worker process) serving one stage's blocks."""

    def __init__(self, stage: Stage, out: str) -> None:
        self.stage, self.out = stage, out

    def __call__(self) -> None:
        from ..allocator import keep_freed_memory

        keep_freed_memory()  # a process that only serves blocks: keep its pages for the next one
        try:
            serve(self.stage.block_function(self.out))
        except SchedulerLost:
            # already logged, once; nobody waits for this process's exit status any more
            # (daisy's own convention for a server that is gone: exit 0, not a failure)
            return
