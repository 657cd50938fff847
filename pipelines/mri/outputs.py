"""The files a segmentation produces, named BIDS-derivatives style beside the input
(or under ``-o DIR``), written as one set (all or none), none overwritten without ``force``.

A scan's set is complete when its ``_dseg.nii.gz`` exists: ``write_outputs`` renames the
``_dseg`` last (and deletes an old one first), so other outputs found without it are
leftovers of an interrupted run, replaced without ``force`` (``check_outputs``), and the
hidden temporaries a killed run left beside them are deleted by the next run.

The one home of those names (``OUTPUT_SUFFIXES``, ``role``, ``subject_stem``,
``outputs_beside``) and of the ``_dseg.tsv`` label table (``write_label_table``,
``read_label_table``): psc-segment, psc-eval, psc-view and the napari plugin's reader and
writer all use them. Importing this module is cheap (no torch, no SimpleITK)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from nibabel.affines import voxel_sizes

from psc.utils.errors import InputError
from psc.utils.files import remove_stale_temporaries, write_set

from .config import label_colour
from .io import NIBABEL_EXTENSIONS, Scan, scan_stem, write_nifti, write_text

if TYPE_CHECKING:
    from .inference import Segmentation

OUTPUT_SUFFIXES = {"dseg": "_dseg.nii.gz", "dseg_tsv": "_dseg.tsv", "volumes": "_volumes.tsv", "qc": "_qc.png",
                   "probseg": "_probseg.nii.gz", "sidecar": "_dseg.json", "brain_mask": "_desc-brain_mask.nii.gz"}
ROLES = ("dseg", "probseg")  # the label-like outputs; anything else is an image (a scan)
BRAIN_MASK_STEM = "_desc-brain_mask"  # BIDS derivative: the brain mask psc extracted
COMMIT = "dseg"  # written last: a scan's outputs are a complete set exactly when this one exists


def output_paths(scan_path: Path, out_dir: Path | None, probabilities: bool,
                 brain_mask: bool = False) -> dict[str, Path]:
    """Every output of one scan; ``probseg`` with ``probabilities``, ``brain_mask`` when
    psc may extract the brain (``write_outputs`` skips it when it did not)."""
    folder = Path(out_dir) if out_dir is not None else Path(scan_path).parent
    named = _named(folder, scan_stem(scan_path))
    return {key: path for key, path in named.items()
            if (probabilities or key != "probseg") and (brain_mask or key != "brain_mask")}


def _named(folder: Path, stem: str) -> dict[str, Path]:
    return {key: folder / f"{stem}{suffix}" for key, suffix in OUTPUT_SUFFIXES.items()}


def scan_outputs(paths: dict[str, Path]) -> dict[str, Path]:
    """Every output psc may write for the scan ``paths`` belongs to, whichever options
    made ``paths``: what a new set replaces (a previous ``_probseg``, brain mask...)."""
    dseg = paths[COMMIT]
    return _named(dseg.parent, dseg.name.removesuffix(OUTPUT_SUFFIXES[COMMIT]))


def role(path: str | Path) -> str:
    """``dseg``, ``probseg`` or ``image``, by psc's output names (``x_dseg.nii.gz``...)."""
    stem = scan_stem(path)
    return next((name for name in ROLES if stem.endswith(f"_{name}")), "image")


def is_output(path: str | Path) -> bool:
    """A label map, probability map or brain mask psc wrote (not a scan to segment)."""
    return role(path) != "image" or scan_stem(path).endswith(BRAIN_MASK_STEM)


def subject_stem(path: str | Path) -> str:
    """The stem of the scan an output belongs to: ``x_dseg.nii.gz`` -> ``x``."""
    stem = scan_stem(path)
    kind = role(path)
    return stem.removesuffix(f"_{kind}") if kind != "image" else stem


def outputs_beside(path: str | Path) -> list[Path]:
    """The scan of ``path`` (a scan or one of its outputs) and its probseg and dseg, those
    that exist beside it, in that order (bottom layer first); ``[path]`` if none does."""
    path = Path(path)
    stem = subject_stem(path)
    candidates = [[path]] if role(path) == "image" else [[path.with_name(stem + s) for s in NIBABEL_EXTENSIONS]]
    candidates += [[path.with_name(f"{stem}_{kind}{s}") for s in NIBABEL_EXTENSIONS] for kind in ("probseg", "dseg")]
    found = [next(p for p in group if p.is_file()) for group in candidates if any(p.is_file() for p in group)]
    return found or [path]


def label_table(names: dict[int, str]) -> str:
    """The ``_dseg.tsv`` text (BIDS derivatives): ``index<TAB>name``, one row a label."""
    return "index\tname\n" + "".join(f"{i}\t{n}\n" for i, n in names.items())


def write_label_table(names: dict[int, str], path: Path) -> None:
    write_text(label_table(names), path)


def read_label_table(path: str | Path) -> dict[int, str]:
    """The names in a ``_dseg.tsv`` (empty if there is none or it names nothing)."""
    path = Path(path)
    names: dict[int, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines()[1:]:
            parts = line.split("\t")
            if len(parts) >= 2 and parts[0].strip().lstrip("-").isdigit():
                names[int(parts[0])] = parts[1].strip()
    return names


def label_table_path(dseg: str | Path) -> Path:
    """``x_dseg.nii.gz`` -> ``x_dseg.tsv``, its label table."""
    return Path(dseg).with_name(scan_stem(dseg) + ".tsv")


def check_outputs(paths: dict[str, Path], force: bool) -> None:
    """Refuse before any computation: a complete previous set (its ``_dseg.nii.gz``)
    without ``force``, or a folder that cannot be created or written. Outputs without
    their ``_dseg`` are what an interrupted run left and do not block the re-run.
    Creates nothing, so a refused run leaves the disk as it was; the folder itself is
    made by ``write_outputs``."""
    folder = paths[COMMIT].parent
    if paths[COMMIT].exists() and not force:
        others = [p for key, p in scan_outputs(paths).items() if key != COMMIT and p.exists()]
        raise InputError(f"{paths[COMMIT]} exists (and {len(others)} more); use --force to overwrite")
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot write to output folder {folder}: {ancestor} is not a folder")
    # A real write, not os.access: root passes every permission check, yet a read-only
    # mount or a full disk still refuses it.
    try:
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as error:
        raise InputError(f"cannot write to output folder {folder}: {error.strerror or error}") from None


BRAIN_ROW = "brain"  # the _volumes.tsv row of the brain mask (intracranial volume); index n/a: not a label


def volumes_table(labels: np.ndarray, names: dict[int, str], voxel_volume: float,
                  brain: np.ndarray | None = None) -> str:
    """One row a tissue label; with ``brain`` (the mask psc extracted or was given) a last
    row ``n/a  brain``: the intracranial volume, which the label rows do not sum to."""
    counts = np.bincount(labels.ravel(), minlength=max(names) + 1)
    rows = ["index\tname\tvoxels\tvolume_mm3"]
    rows += [f"{i}\t{name}\t{counts[i]}\t{counts[i] * voxel_volume:.1f}" for i, name in names.items() if i != 0]
    if brain is not None:
        voxels = int((np.asarray(brain) > 0).sum())
        rows.append(f"n/a\t{BRAIN_ROW}\t{voxels}\t{voxels * voxel_volume:.1f}")
    return "\n".join(rows) + "\n"


def sidecar_json(metadata: dict) -> str:
    """The ``_dseg.json`` text (BIDS derivatives sidecar): ``metadata`` with psc's
    ``GeneratedBy`` record first."""
    import json
    from importlib.metadata import PackageNotFoundError, version

    try:
        psc_version = version("psc")
    except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        psc_version = "unknown"
    record = {"GeneratedBy": [{"Name": "psc", "Version": psc_version}], **metadata}
    return json.dumps(record, indent=2, default=str) + "\n"


def write_outputs(seg: Segmentation, scan: Scan, paths: dict[str, Path], names: dict[int, str],
                  brain: np.ndarray | None = None, sidecar: dict | None = None,
                  keep: tuple[Path, ...] = ()) -> None:
    """Every output in ``paths`` as one set (``utils.files.write_set``): all appear
    together, the ``_dseg.nii.gz`` last, or, after an error or Ctrl-C, none does. The set
    replaces the scan's previous one whole: a previous output this set does not include
    (``_probseg`` without ``--probabilities``, a brain mask when none was extracted) is
    deleted, and so are temporaries a killed run left. ``brain``: the brain mask used (on
    the scan's grid), outlined in the QC picture and its volume added to ``_volumes.tsv``;
    written as ``_desc-brain_mask.nii.gz`` when ``paths`` names it. ``sidecar``: what
    ``_dseg.json`` records (options, weights, skull-strip decision, warnings). ``keep``:
    the run's own inputs (a ``--mask`` that is a previous run's brain mask), never deleted."""
    paths[COMMIT].parent.mkdir(parents=True, exist_ok=True)
    writers = output_writers(seg, scan, paths, names, brain, sidecar)
    everything = scan_outputs(paths)
    remove_stale_temporaries(everything.values())
    kept = {Path(path).resolve() for path in keep}
    obsolete = [path for key, path in everything.items()
                if key not in writers and path.exists() and path.resolve() not in kept]
    write_set([(paths[key], write) for key, write in writers.items()], remove=obsolete)


def output_writers(seg: Segmentation, scan: Scan, paths: dict[str, Path], names: dict[int, str],
                   brain: np.ndarray | None, sidecar: dict | None) -> dict[str, Callable[[str], None]]:
    """Key -> ``write(tmp)`` for each output ``write_outputs`` writes, ``_dseg`` last.
    The QC picture, the slow part, is drawn here, before any temporary exists."""
    png = qc_png(scan, seg.labels, names, brain)
    texts = {"dseg_tsv": label_table(names), "volumes": volumes_table(seg.labels, names, scan.voxel_volume, brain)}
    if "sidecar" in paths:
        texts["sidecar"] = sidecar_json(sidecar or {})
    writers: dict[str, Callable[[str], None]] = {key: _text_writer(text) for key, text in texts.items()}
    writers["qc"] = lambda tmp: Path(tmp).write_bytes(png)
    if "probseg" in paths:
        writers["probseg"] = lambda tmp: write_nifti(np.moveaxis(seg.probabilities, 0, -1), scan, Path(tmp),
                                                     dtype=np.float32)
    if "brain_mask" in paths and brain is not None:
        mask = (np.asarray(brain) > 0).astype(np.uint8)
        writers["brain_mask"] = lambda tmp: write_nifti(mask, scan, Path(tmp), dtype=np.uint8)
    writers[COMMIT] = lambda tmp: write_nifti(seg.labels, scan, Path(tmp), dtype=np.uint8)
    return writers


def _text_writer(text: str) -> Callable[[str], None]:
    return lambda tmp: Path(tmp).write_text(text)


def _to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Array and voxel sizes in (nearest) RAS voxel order, so every scan is shown the
    same way up whatever its storage order; display only, no resampling."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    to_ras = nib.orientations.ornt_transform(ornt, nib.orientations.axcodes2ornt("RAS"))
    zooms = voxel_sizes(affine)
    return nib.orientations.apply_orientation(array, to_ras), zooms[ornt[:, 0].argsort()]


def qc_png(scan: Scan, labels: np.ndarray, names: dict[int, str], brain: np.ndarray | None = None) -> bytes:
    """Axial, coronal and sagittal slices through the brain's centre of mass (of the
    brain mask ``brain`` when there is one, else of the labels, else of the nonzero
    voxels), zoomed to it, with the mask outlined in yellow: the T1 alone above,
    the labels overlaid below (a fill hides the very boundaries one wants to judge),
    in neurological convention (left on the left) with the axis letters drawn and each
    tissue's volume in the legend; enough to catch a flipped or shifted output, a
    failed skull strip or a missing tissue at a glance."""
    # A bare Figure (Agg canvas), not pyplot: no global backend switch, no figure
    # registry to leak, safe inside a notebook or a thread.
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image, zooms = _to_ras(scan.array.astype(np.float32), scan.affine)
    label, _ = _to_ras(labels, scan.affine)
    outline = None if brain is None else _to_ras(np.asarray(brain) > 0, scan.affine)[0].astype(bool)
    # The brain: the mask, else the labels, else the nonzero voxels (a whole head).
    region = next(r for r in (outline, label > 0, image != 0, np.ones(image.shape, bool))
                  if r is not None and np.any(r))
    found = np.argwhere(region)  # zoom in on the brain, leaving room for the letters
    margin = np.ceil(12.0 / zooms).astype(int)
    box = tuple(slice(max(lo - m, 0), hi + m + 1) for lo, hi, m in zip(found.min(0), found.max(0), margin))
    image, label, region = image[box], label[box], region[box]
    outline = outline[box] if outline is not None else None
    x, y, z = found.mean(0).round().astype(int) - np.array([b.start for b in box])
    inside = region & (image != 0) if np.any(region & (image != 0)) else np.ones(image.shape, bool)
    low, high = np.percentile(image[inside], [0.5, 99.5])
    low = min(low, 0.0)  # a skull-stripped T1: background black, CSF dark, not clipped away
    lut = np.zeros((max(max(names), int(label.max())) + 1, 4), np.float32)  # label -> RGBA
    for index in range(1, len(lut)):
        lut[index] = (*label_colour(index), 0.4)
    cut = lambda volume, axis, at: None if volume is None else np.take(volume, at, axis=axis).T  # noqa: E731
    views = [  # title, image slice (rows, columns), label slice, row and column voxel size, axis letters, mask
        ("axial", image[:, :, z].T, label[:, :, z].T, zooms[1], zooms[0], "LRPA", cut(outline, 2, z)),
        ("coronal", image[:, y, :].T, label[:, y, :].T, zooms[2], zooms[0], "LRIS", cut(outline, 1, y)),
        ("sagittal", image[x, :, :].T, label[x, :, :].T, zooms[2], zooms[1], "PAIS", cut(outline, 0, x)),
    ]
    widths = [img.shape[1] * dx for _, img, _, _, dx, _, _ in views]
    tallest = max(img.shape[0] * dy for _, img, _, dy, _, _, _ in views)
    fig = Figure(figsize=(11, 8), facecolor="black")
    axes = fig.subplots(2, 3, width_ratios=widths, gridspec_kw={"wspace": 0.03, "hspace": 0.03})
    for column, (title, img, lab, dy, dx, letters, edge) in enumerate(views):
        extent = (0, img.shape[1] * dx, 0, img.shape[0] * dy)  # mm: physical aspect, one scale
        for row, ax in enumerate(axes[:, column]):
            ax.imshow(img, cmap="gray", origin="lower", vmin=low, vmax=high, extent=extent)
            if row == 1:
                ax.imshow(lut[lab], origin="lower", extent=extent, interpolation="nearest")
            if edge is not None and edge.any() and not edge.all():
                ax.contour(edge.astype(np.float32), levels=[0.5], colors="yellow", linewidths=0.8, origin="lower", extent=extent)
            ax.set_xlim(0, extent[1])
            ax.set_ylim(0, tallest)
            ax.set_anchor("S")
            ax.set_facecolor("black")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            style = {"color": "0.8", "fontsize": 10, "fontweight": "bold", "transform": ax.transData}
            middle = extent[3] / 2
            ax.text(2, middle, letters[0], ha="left", va="center", **style)
            ax.text(extent[1] - 2, middle, letters[1], ha="right", va="center", **style)
            ax.text(extent[1] / 2, 2, letters[2], ha="center", va="bottom", **style)
            ax.text(extent[1] / 2, extent[3] - 2, letters[3], ha="center", va="top", **style)
        axes[0, column].set_title(title, color="white", fontsize=11)
    counts = np.bincount(labels.ravel(), minlength=len(lut))
    handles = [Patch(color=label_colour(i), label=f"{name}  {counts[i] * scan.voxel_volume / 1000:.0f} ml")
               for i, name in names.items() if i]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white",
               fontsize=11, handlelength=1.2, columnspacing=2.5)
    fig.suptitle(scan.path.name, color="white", fontsize=12)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.92, bottom=0.06)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, facecolor="black")
    return buffer.getvalue()
