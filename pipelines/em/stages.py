"""The blockwise stages as picklable block functions.

daisy ships a block function to each worker process once and calls it per block, so the
expensive state (the network, open arrays, the database connection, the lookup table)
is built on the first call inside the worker and kept: a model is loaded once per worker,
not once per block. Every stage reads its *read* region and writes only its *write*
region (daisy's contract), and a block that is run twice writes the same result.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from funlib.geometry import Coordinate, Roi

from . import layout
from .affinities import from_uint8, to_uint8
from .agglomerate import score_edges
from .fragments import block_index, globalise, watershed_fragments
from .graph import GraphStore, apply_lookup
from .volumes import open_volume


def worker_id() -> int:
    """This worker's number from daisy's context (0 outside a distributed run)."""
    if "DAISY_CONTEXT" not in os.environ:
        return 0
    import daisy

    return int(daisy.Context.from_env()["worker_id"])


class Stage:
    """Base of the block functions: settings by output path, state built lazily."""

    name = ""

    def __init__(self, out: str | Path) -> None:
        self.out = str(out)
        self._ready = False

    def __getstate__(self):
        return {"out": self.out, "_ready": False}

    def _setup(self) -> None:
        self.settings = layout.RunSettings.load(self.out)
        torch.set_num_threads(max(1, self.settings.threads_per_worker))
        volume = open_volume(self.out, layout.FRAGMENTS, mode="r+")
        self.volume_roi = volume.roi
        self.block_shape = Coordinate(self.settings.block_size)
        self.grid_shape = [-(-s // b) for s, b in zip(volume.shape, self.block_shape)]

    def block_index(self, roi: Roi) -> int:
        return block_index(roi.offset, self.block_shape, self.grid_shape)

    def __call__(self, block) -> None:
        if not self._ready:
            self._setup()
            self._ready = True
        self.process(block.read_roi.intersect(self.volume_roi), block.write_roi)

    def process(self, read_roi: Roi, write_roi: Roi) -> None:
        raise NotImplementedError


class PredictStage(Stage):
    name = "predict"

    def _setup(self) -> None:
        super()._setup()
        from .predict import AffinityPredictor

        device = self.settings.device
        if device == "auto":  # left to the worker (remote workers): its own GPU if it has one
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and ":" not in device and torch.cuda.is_available():
            device = f"cuda:{worker_id() % torch.cuda.device_count()}"  # one GPU per worker
        self.predictor = AffinityPredictor(self.settings.weights, device=device,
                                           precision=self.settings.precision)
        self.raw = open_volume(self.settings.raw, self.settings.raw_name)
        self.affinities = open_volume(self.out, layout.AFFINITIES, mode="r+")

    def process(self, read_roi: Roi, write_roi: Roi) -> None:
        self.affinities.write(write_roi, to_uint8(self.predictor.predict(self.raw, write_roi)))


class FragmentStage(Stage):
    name = "fragments"

    def _setup(self) -> None:
        super()._setup()
        self.affinities = open_volume(self.out, layout.AFFINITIES)
        self.fragments = open_volume(self.out, layout.FRAGMENTS, mode="r+")
        self.graph = GraphStore(layout.graph_path(self.out))

    def process(self, read_roi: Roi, write_roi: Roi) -> None:
        affinities = from_uint8(self.affinities.read(read_roi))
        fragments = watershed_fragments(affinities, self.settings.fragment_threshold)
        crop = (write_roi - read_roi.offset).to_slices()
        index = self.block_index(write_roi)
        labelled, ids, sizes = globalise(fragments[crop], index)
        self.fragments.write(write_roi, labelled)
        self.graph.write_fragments(index, ids, sizes)


class EdgeStage(Stage):
    name = "edges"

    def _setup(self) -> None:
        super()._setup()
        self.affinities = open_volume(self.out, layout.AFFINITIES)
        self.fragments = open_volume(self.out, layout.FRAGMENTS)
        self.graph = GraphStore(layout.graph_path(self.out))

    def process(self, read_roi: Roi, write_roi: Roi) -> None:
        index = self.block_index(write_roi)
        fragments = self.fragments.read(read_roi)
        affinities = from_uint8(self.affinities.read(read_roi))
        owned = [e for e in score_edges(affinities, fragments) if (e[0] >> 32) == index]
        self.graph.write_edges(index, owned)


class RelabelStage(Stage):
    name = "relabel"

    def _setup(self) -> None:
        super()._setup()
        self.fragments = open_volume(self.out, layout.FRAGMENTS)
        self.segmentation = open_volume(self.out, layout.SEGMENTATION, mode="r+")
        graph = GraphStore(layout.graph_path(self.out))
        self.ids, self.segments = graph.lookup(self.settings.threshold)
        graph.close()

    def process(self, read_roi: Roi, write_roi: Roi) -> None:
        fragments = self.fragments.read(write_roi)
        self.segmentation.write(write_roi, apply_lookup(fragments, self.ids, self.segments))


STAGES = {stage.name: stage for stage in (PredictStage, FragmentStage, EdgeStage, RelabelStage)}


def serve(function: Stage) -> None:
    """Take blocks from the scheduler until none are left.

    A block that raises is reported to daisy as failed (daisy's ``acquire_block``
    context does that, with the traceback) and the worker goes on with the next block:
    daisy retries the failed block up to the task's ``max_retries`` and then counts it as
    failed, instead of restarting crashed workers until the whole task is abandoned.
    """
    import logging

    import daisy

    client = daisy.Client()
    while True:
        try:
            with client.acquire_block() as block:
                if block is None:
                    return
                function(block)
        except Exception as error:  # already reported to the scheduler by acquire_block
            logging.getLogger(__name__).warning("block failed: %s", error)


class StageWorker:
    """A daisy worker function (one per worker process) serving one stage's blocks."""

    def __init__(self, stage: type[Stage], out: str) -> None:
        self.stage, self.out = stage, out

    def __call__(self) -> None:
        from ..allocator import keep_freed_memory

        keep_freed_memory()  # a process that only serves blocks: keep its pages for the next one
        serve(self.stage(self.out))
