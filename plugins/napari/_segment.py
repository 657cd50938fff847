"""What the Segment widget runs, without any GUI: psc's MRI and EM pipelines on the
data of an image layer, reporting progress through a callback.

MRI: ``segment_scan`` on the layer's array with its affine (the source scan's, or one
built from ``scale``/``translate``), so the labels land on the image's own voxels.
EM: the blockwise pipeline (``prepare`` + ``run``, one stage after the other, in this
process) on the layer's zarr array if it came from one, else on a copy written to a
temporary container; the result is an EM run (``OUT.zarr``) like ``psc-segment``'s.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

from psc.models.weights import EM_AFFINITY, MRI_TISSUE, read_card  # read_card: the verified card (sha256)
from psc.pipelines.em.options import FALLBACK_THRESHOLD, EMRunOptions
from psc.utils.errors import InputError

Progress = Callable[[int, int, str], None]
KIND_NAMES = {MRI_TISSUE: "MRI tissue", EM_AFFINITY: "EM affinity"}


def default_weights(pipeline: str) -> Path:
    """The shipped weights of pipeline ``mri`` or ``em`` (``psc.models.shipped``)."""
    from psc.models.shipped import default_weights as shipped

    return shipped(EM_AFFINITY if pipeline == "em" else MRI_TISSUE).path


def is_em_card(card) -> bool:
    return card.kind == EM_AFFINITY


def _wrong_kind(weights: str | Path, card, wanted: str) -> InputError:
    other = "MRI" if wanted == EM_AFFINITY else "EM"
    return InputError(f"{Path(weights).name} is an {KIND_NAMES.get(card.kind, card.kind)} model ({card.kind}), "
                      f"not an {KIND_NAMES[wanted]} model; pick the {other} pipeline or another model")


@functools.lru_cache(maxsize=2)
def _brain_extractor(device: str):
    """deepbet's networks, loaded once per device for the napari session (not per click)."""
    from psc.pipelines.mri.brain import BrainExtractor

    return BrainExtractor(device)


def segment_mri(data: Any, affine: np.ndarray, weights: str | Path, device: str = "auto",
                progress: Progress | None = None, skull_strip: str = "auto",
                ) -> tuple[np.ndarray, dict[int, str], np.ndarray | None, list[str]]:
    """(labels on the image's grid, label names, the brain mask psc extracted or None,
    the plausibility warnings psc-segment would print) for a 3-D T1 image: the same
    validation, brain step and plausibility check as psc-segment. ``skull_strip`` is
    psc-segment's ``--skull-strip``: ``auto`` extracts the brain (deepbet) only when the
    image is not already skull-stripped."""
    from psc.pipelines.inference import load_network
    from psc.pipelines.mri.brain import BrainStage
    from psc.pipelines.mri.inference import segment_scan
    from psc.pipelines.mri.io import Scan, validate_scan
    from psc.pipelines.mri.plausibility import check as plausibility

    array = np.asarray(data)
    if array.ndim != 3:
        raise InputError(f"the MRI pipeline segments 3-D images; this layer is {array.ndim}-D")
    try:  # psc-segment's checks (empty, constant, NaN, geometry...), worded for a layer
        scan = validate_scan(Scan(Path("napari-layer"), array, np.asarray(affine, dtype=np.float64)))
    except InputError as error:
        raise InputError(f"this layer {error}") from None
    if Path(weights) == default_weights("mri"):  # the default: chosen by voxel size, as psc-segment does
        from psc.pipelines.mri.default_model import default_model_for

        weights = default_model_for(scan.voxel_sizes).path
    card = read_card(weights)
    if card.kind != MRI_TISSUE:
        raise _wrong_kind(weights, card, MRI_TISSUE)
    network = load_network(weights, MRI_TISSUE, device)  # sha256 and kind checked, fused, on its device
    brain = BrainStage(skull_strip, None, str(network.device), _brain_extractor)(scan)
    if brain.extracted and progress:
        progress(0, 1, f"brain extracted ({brain.seconds:.1f} s)")
    on_window = (lambda done, total: progress(done, total, f"window {done}/{total}")) if progress else None
    segmentation = segment_scan(scan, network, network.card, mask=brain.mask, on_window=on_window)
    mask = brain.mask.array.astype(bool) if brain.extracted else None
    warnings = plausibility(segmentation.labels, network.card.labels, scan.voxel_volume,
                            brain.mask.array if brain.mask is not None else None, scan.voxel_sizes)
    return segmentation.labels, dict(network.card.labels), mask, warnings


def write_raw(data: Any, voxel_size, offset, folder: Path) -> str:
    """A copy of an in-memory image as ``folder/raw.zarr/raw``, for the EM pipeline."""
    from psc.pipelines.em.blocks import slabs
    from psc.pipelines.em.volumes import create_volume

    shape = tuple(int(s) for s in data.shape)
    volume = create_volume(folder / "raw.zarr", "raw", shape, np.dtype(data.dtype), tuple(min(64, s) for s in shape),
                           voxel_size, offset, overwrite=True)
    for slab in slabs(shape, volume.array):
        volume.array[slab] = np.asarray(data[slab])
    return str(folder / "raw.zarr" / "raw")


def segment_em(raw: str | None, out: str | Path | None, weights: str | Path, device: str = "auto",
               data: Any = None, voxel_size=(1.0, 1.0, 1.0), offset=(0.0, 0.0, 0.0),
               overwrite: bool = False, block_size=EMRunOptions.block_size, threshold: float = FALLBACK_THRESHOLD,
               progress: Progress | None = None) -> Path:
    """Run the EM pipeline; returns the run's ``OUT.zarr``. ``raw`` is a zarr array path
    (``RAW.zarr/raw``); without it ``data`` is copied to a temporary container first."""
    from psc.pipelines.em.run import prepare, run
    from psc.pipelines.em.stages import STAGES
    from psc.pipelines.devices import resolve_device
    from psc.pipelines.em.layout import default_output

    card = read_card(weights)  # before any work: a corrupt file is one message, not a failure per block
    if not is_em_card(card):
        raise _wrong_kind(weights, card, EM_AFFINITY)
    device = str(resolve_device(device))
    folder = None
    if raw is None:
        if data is None or len(data.shape) != 3:
            raise InputError("the EM pipeline segments a 3-D (z, y, x) volume")
        folder = Path(tempfile.mkdtemp(prefix="psc-napari-"))
        raw = write_raw(data, voxel_size, offset, folder)
    if out is None:  # beside the raw container, as psc-segment does
        out = folder / "out.zarr" if folder else default_output(raw)
    out = Path(out)
    # force: psc-segment's --force, which removes only what a psc run wrote and refuses
    # a container that is not one (never a blanket rmtree of the chosen folder).
    prepare(str(raw), out, weights, block_size=block_size, threshold=threshold, device=device, workers=1,
            force=overwrite)
    for done, stage in enumerate(STAGES, 1):
        if progress:
            progress(done - 1, len(STAGES), stage.name)
        run(out, workers=0, progress=False, stages=(stage.name,))
    if progress:
        progress(len(STAGES), len(STAGES), "done")
    return out
