"""The files a segmentation produces, named BIDS-derivatives style beside the input
(or under ``-o DIR``), each written atomically, none overwritten without ``force``."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..errors import InputError
from .inference import Segmentation
from .io import Scan, _atomic, scan_stem, write_nifti, write_text

OVERLAY_COLOURS = {1: (0.15, 0.55, 1.0), 2: (1.0, 0.35, 0.2), 3: (1.0, 0.9, 0.2)}


def output_paths(scan_path: Path, out_dir: Path | None, probabilities: bool) -> dict[str, Path]:
    stem = scan_stem(scan_path)
    folder = Path(out_dir) if out_dir is not None else Path(scan_path).parent
    names = {"dseg": "_dseg.nii.gz", "dseg_tsv": "_dseg.tsv", "volumes": "_volumes.tsv", "qc": "_qc.png"}
    if probabilities:
        names["probseg"] = "_probseg.nii.gz"
    return {key: folder / f"{stem}{suffix}" for key, suffix in names.items()}


def check_outputs(paths: dict[str, Path], force: bool) -> None:
    """Refuse before any computation: existing outputs without ``force``, or a folder
    that cannot be created or written."""
    folder = next(iter(paths.values())).parent
    existing = [p.name for p in paths.values() if p.exists()]
    if existing and not force:
        raise InputError(f"{folder / existing[0]} exists (and {len(existing) - 1} more); use --force to overwrite")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".psc-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise InputError(f"cannot write to output folder {folder}: {error.strerror or error}") from None


def volumes_table(labels: np.ndarray, names: dict[int, str], voxel_volume: float) -> str:
    counts = np.bincount(labels.ravel(), minlength=max(names) + 1)
    rows = ["index\tname\tvoxels\tvolume_mm3"]
    rows += [f"{i}\t{name}\t{counts[i]}\t{counts[i] * voxel_volume:.1f}" for i, name in names.items() if i != 0]
    return "\n".join(rows) + "\n"


def write_outputs(seg: Segmentation, scan: Scan, paths: dict[str, Path], names: dict[int, str]) -> None:
    write_nifti(seg.labels, scan, paths["dseg"], dtype=np.uint8)
    write_text("index\tname\n" + "".join(f"{i}\t{n}\n" for i, n in names.items()), paths["dseg_tsv"])
    write_text(volumes_table(seg.labels, names, scan.voxel_volume), paths["volumes"])
    if "probseg" in paths:
        write_nifti(np.moveaxis(seg.probabilities, 0, -1), scan, paths["probseg"], dtype=np.float32)
    png = qc_png(scan, seg.labels, names)
    _atomic(paths["qc"], lambda tmp: Path(tmp).write_bytes(png))


def _to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Array and voxel sizes in RAS voxel order, for display only."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    to_ras = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))
    return nib.orientations.apply_orientation(array, to_ras), zooms[ornt[:, 0].argsort()]


def qc_png(scan: Scan, labels: np.ndarray, names: dict[int, str]) -> bytes:
    """Axial, coronal and sagittal slices through the brain centre, labels overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    image, zooms = _to_ras(scan.array.astype(np.float32), scan.affine)
    label, _ = _to_ras(labels, scan.affine)
    brain = np.argwhere(image != 0)
    centre = brain.mean(0).astype(int) if len(brain) else np.array(image.shape) // 2
    top = np.percentile(image[image != 0], 99.5) if len(brain) else 1.0
    colours = ListedColormap([(0, 0, 0, 0)] + [(*OVERLAY_COLOURS.get(i, (0.6, 0.6, 0.6)), 1.0)
                                               for i in range(1, max(names) + 1)])
    views = [  # (title, image slice, label slice, (row voxel size, column voxel size))
        ("axial", image[:, :, centre[2]].T, label[:, :, centre[2]].T, (zooms[1], zooms[0])),
        ("coronal", image[:, centre[1], :].T, label[:, centre[1], :].T, (zooms[2], zooms[0])),
        ("sagittal", image[centre[0], :, :].T, label[centre[0], :, :].T, (zooms[2], zooms[1])),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), facecolor="black")
    for ax, (title, img, lab, (dy, dx)) in zip(axes, views):
        ax.imshow(img, cmap="gray", origin="lower", vmin=0, vmax=top, aspect=dy / dx, interpolation="nearest")
        ax.imshow(np.ma.masked_equal(lab, 0), cmap=colours, vmin=0, vmax=max(names), alpha=0.45,
                  origin="lower", aspect=dy / dx, interpolation="nearest")
        ax.set_title(title, color="white")
        ax.axis("off")
    handles = [Patch(color=OVERLAY_COLOURS.get(i, (0.6, 0.6, 0.6)), label=n) for i, n in names.items() if i]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white")
    fig.suptitle(scan.path.name, color="white")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, facecolor="black")
    plt.close(fig)
    return buffer.getvalue()
