"""What the Segment widget runs, without any GUI: psc's MRI and EM pipelines on the
data of an image layer, reporting progress through a callback.

MRI: ``segment_scan`` on the layer's array with its affine (the source scan's, or one
built from ``scale``/``translate``), so the labels land on the image's own voxels.
EM: the blockwise pipeline (``prepare`` + ``run``, one stage after the other, in this
process) on the layer's zarr array if it came from one, else on a copy written to a
temporary container; the result is an EM run (``OUT.zarr``) like ``psc-segment``'s.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

Progress = Callable[[int, int, str], None]


def default_weights(pipeline: str) -> Path:
    if pipeline == "em":
        from psc.app.segment_em import DEFAULT_EM_WEIGHTS

        return DEFAULT_EM_WEIGHTS
    from psc.app.segment import DEFAULT_WEIGHTS

    return DEFAULT_WEIGHTS


def read_card(weights: str | Path):
    from psc.models.weights import ModelCard, card_path
    from psc.utils.errors import InputError

    weights = Path(weights)
    if not weights.is_file():
        raise InputError(f"weights not found: {weights}")
    try:
        return ModelCard.from_json(card_path(weights))
    except (OSError, ValueError, TypeError) as error:
        raise InputError(f"{weights}: no readable model card beside it ({error})") from None


def is_em_card(card) -> bool:
    return card.backbone == "unet3d" and card.out_channels == 3


def segment_mri(data: Any, affine: np.ndarray, weights: str | Path, device: str = "auto",
                progress: Progress | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """(labels on the image's grid, label names) for a 3-D T1 image."""
    from psc.models.weights import load_weights
    from psc.utils.errors import InputError
    from psc.pipelines.mri.inference import resolve_device, segment_scan
    from psc.pipelines.mri.io import Scan

    array = np.asarray(data)
    if array.ndim != 3:
        raise InputError(f"the MRI pipeline segments 3-D images; this layer is {array.ndim}-D")
    if not np.any(array):
        raise InputError("the image is empty (every voxel is zero)")
    if is_em_card(read_card(weights)):
        raise InputError(f"{Path(weights).name} is an EM affinity model; pick the EM pipeline or an MRI model")
    resolve_device(device)
    model, card = load_weights(weights)
    scan = Scan(Path("napari-layer"), array, np.asarray(affine, dtype=np.float64))
    on_window = (lambda done, total: progress(done, total, f"window {done}/{total}")) if progress else None
    segmentation = segment_scan(scan, model, card, device=device, on_window=on_window)
    return segmentation.labels, dict(card.labels)


def write_raw(data: Any, voxel_size, offset, folder: Path) -> str:
    """A copy of an in-memory image as ``folder/raw.zarr/raw``, for the EM pipeline."""
    from psc.pipelines.em.volumes import create_volume

    shape = tuple(int(s) for s in data.shape)
    volume = create_volume(folder / "raw.zarr", "raw", shape, np.dtype(data.dtype), tuple(min(64, s) for s in shape),
                           voxel_size, offset, overwrite=True)
    for z in range(0, shape[0], 64):
        volume.array[z:z + 64] = np.asarray(data[z:z + 64])
    return str(folder / "raw.zarr" / "raw")


def segment_em(raw: str | None, out: str | Path | None, weights: str | Path, device: str = "auto",
               data: Any = None, voxel_size=(1.0, 1.0, 1.0), offset=(0.0, 0.0, 0.0),
               overwrite: bool = False, block_size=(64, 64, 64), threshold: float = 0.5,
               progress: Progress | None = None) -> Path:
    """Run the EM pipeline; returns the run's ``OUT.zarr``. ``raw`` is a zarr array path
    (``RAW.zarr/raw``); without it ``data`` is copied to a temporary container first."""
    from psc.pipelines.em.run import prepare, run
    from psc.pipelines.em.stages import STAGES
    from psc.utils.errors import InputError
    from psc.pipelines.mri.inference import resolve_device

    if not is_em_card(read_card(weights)):
        raise InputError(f"{Path(weights).name} is not an affinity U-Net for EM; pick the MRI pipeline or an EM model")
    device = str(resolve_device(device))
    folder = None
    if raw is None:
        if data is None or len(data.shape) != 3:
            raise InputError("the EM pipeline segments a 3-D (z, y, x) volume")
        folder = Path(tempfile.mkdtemp(prefix="psc-napari-"))
        raw = write_raw(data, voxel_size, offset, folder)
    if out is None:  # beside the raw container, as psc-segment does
        container = Path(raw).parent
        out = folder / "out.zarr" if folder else container.with_name(container.name.removesuffix(".zarr") + "_psc.zarr")
    out = Path(out)
    if overwrite and out.exists():
        shutil.rmtree(out)
    prepare(str(raw), out, weights, block_size=block_size, threshold=threshold, device=device, workers=1)
    for done, stage in enumerate(STAGES, 1):
        if progress:
            progress(done - 1, len(STAGES), stage.name)
        run(out, workers=0, progress=False, stages=(stage.name,))
    if progress:
        progress(len(STAGES), len(STAGES), "done")
    return out
