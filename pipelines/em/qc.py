"""A QC picture of an EM run: the middle z section of raw, affinities (z, y, x as
red, green, blue) and the segmentation over the raw. It reads one section of each array,
so it costs the same for any volume size."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from psc.utils.files import atomic_write

from . import layout
from .volumes import open_volume


def _colours(labels: np.ndarray) -> np.ndarray:
    """A stable pseudo-random colour per id (the same id gets the same colour anywhere)."""
    ids = labels.astype(np.uint64)
    hashed = (ids * np.uint64(2654435761)) % np.uint64(2**24)
    rgb = np.stack([(hashed >> np.uint64(s)) & np.uint64(255) for s in (16, 8, 0)], -1).astype(np.float32) / 255
    return np.where(labels[..., None] == 0, 0.0, 0.3 + 0.7 * rgb)


def qc_png(out: str | Path, z: int | None = None) -> bytes:
    # A bare Figure (Agg canvas), not pyplot, as the MRI QC picture: no global backend
    # switch (a napari process keeps its Qt backend), no figure registry to leak.
    from matplotlib.figure import Figure

    settings = layout.RunSettings.load(out)
    raw = open_volume(settings.raw, settings.raw_name)
    z = raw.shape[0] // 2 if z is None else z
    section = raw.array[z]
    affinities = open_volume(out, layout.AFFINITIES).array[:, z].astype(np.float32) / 255
    segmentation = open_volume(out, layout.SEGMENTATION).array[z]
    fig = Figure(figsize=(12, 4.4))
    axes = fig.subplots(1, 3)
    axes[0].imshow(section, cmap="gray")
    axes[0].set_title(f"raw, z = {z}")
    axes[1].imshow(np.moveaxis(affinities, 0, -1))
    axes[1].set_title("affinities (z, y, x = R, G, B)")
    axes[2].imshow(section, cmap="gray")
    axes[2].imshow(np.dstack([_colours(segmentation), 0.45 * (segmentation > 0)]))
    axes[2].set_title(f"segmentation at t = {settings.threshold:g} ({len(np.unique(segmentation))} ids here)")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def write_qc(out: str | Path) -> Path:
    path = Path(out) / "qc.png"
    png = qc_png(out)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(png))
    return path
