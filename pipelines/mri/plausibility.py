"""Is a segmentation plausible for an adult brain? Never silently wrong: a result outside
these ranges is still written, with a warning on stderr and in its ``_dseg.json``.

The ranges (adults, 18-90 years), chosen wide, about the population range plus the
spread of segmentation methods, so a normal adult scan never warns while a whole head
segmented as brain (GM+WM of 1.8-3.2 L on mrtrix-sub01) or half a brain always does:

* total brain tissue, GM + WM: ``TISSUE_LITRES`` = 0.8-1.8 L. Allen et al. 2002
  (AJNR 23:1327, 46 adults): brain volume 1.27 +- 0.12 L in men, 1.13 +- 0.10 L in
  women; Good et al. 2001 (NeuroImage 14:21, 465 adults): GM ~0.75 L + WM ~0.45 L. The
  MNI152 2009 template, larger than an individual brain (registration averaging),
  segments to 1.74 L, near the top.
* GM/WM ratio: ``GM_WM_RATIO`` = 0.9-2.5. About 1.3-1.8 in adults (Good et al. 2001;
  Ge et al. 2002, AJNR 23:1327: GM falls and WM peaks around 40-50 years), wider here
  since methods place the GM/WM boundary differently: IBSR's manual labels give
  1.48-2.25 (IBSR_16: 2.25), FreeSurfer 1.07 on mrtrix-sub01, psc 1.68 on MNI152.
* CSF: at least ``MIN_CSF_FRACTION`` (0.4 %) of GM + WM. The ventricles alone hold
  7-50 ml in adults (Kruggel 2006), and IBSR's manual CSF is 8.8-32 ml, 0.75-2.8 % of its
  GM + WM; a network that finds almost none has missed the ventricles, as the shipped
  model does on 3 mm and 5 mm-slice scans (1-4 ml, CSF Dice 0.04-0.38,
  docs/results-mri.md).
* voxel size: at most ``MAX_VOXEL_MM`` (2 mm, +2 % for rounding) along every axis.
  psc's models are trained and validated on 1-2 mm scans; on coarser voxels thin
  structures are unreliable however plausible the volumes look, so the result says so.
* intracranial volume, the brain mask: ``INTRACRANIAL_LITRES`` = 1.0-2.1 L. Buckner
  et al. 2004 (NeuroImage 23:724, adults 18-93): estimated total intracranial volume
  1.2-1.8 L; Malone et al. 2015 (NeuroImage 104:366) similar.
* tissue on the faces of the field of view: at most ``MAX_BORDER_FRACTION`` (0.5 %) of
  the labelled voxels. A brain inside its field of view touches it at most where the
  brainstem leaves it (MNI152: 0 %); labels all along the faces mean the head, neck
  or background was labelled as tissue.

Not for children (a 2-year-old's brain is ~0.9 L, a newborn's ~0.4 L, with a GM/WM ratio
far from an adult's), nor strong atrophy (GM+WM can fall below 0.8 L in advanced
neurodegeneration) or resections: those warn although the segmentation may be right;
the warning asks for a look at the QC picture, it does not reject the output."""

from __future__ import annotations

import numpy as np

TISSUE_LITRES = (0.8, 1.8)
GM_WM_RATIO = (0.9, 2.5)
MIN_CSF_FRACTION = 0.004
MAX_VOXEL_MM = 2.0
INTRACRANIAL_LITRES = (1.0, 2.1)
MAX_BORDER_FRACTION = 0.005


def _label(names: dict[int, str], name: str) -> int | None:
    return next((i for i, n in names.items() if n.upper() == name), None)


def border_fraction(labels: np.ndarray) -> float:
    """The fraction of labelled voxels lying on the six faces of the grid."""
    tissue = np.asarray(labels) > 0
    total = int(tissue.sum())
    if not total:
        return 0.0
    faces = np.zeros(tissue.shape, bool)
    for axis in range(tissue.ndim):
        for end in (0, -1):
            index = [slice(None)] * tissue.ndim
            index[axis] = end
            faces[tuple(index)] = True
    return float((tissue & faces).sum()) / total


def is_coarse(voxel_sizes) -> bool:
    """Voxels coarser than ``MAX_VOXEL_MM`` (2 % allowed for rounding) along any axis:
    outside the validated range (a warning), and segmented by the coarse model
    (``default_model.py``)."""
    return max(float(v) for v in voxel_sizes) > MAX_VOXEL_MM * 1.02


def check(labels: np.ndarray, names: dict[int, str], voxel_volume: float,
          brain: np.ndarray | None = None, voxel_sizes=None) -> list[str]:
    """The warnings for one segmentation (empty: plausible). ``voxel_volume`` in mm^3;
    ``brain``: the brain mask used (extracted or given), on the same grid;
    ``voxel_sizes``: the scan's voxel sizes in mm (``io.voxel_sizes(affine)``)."""
    warnings: list[str] = []
    if voxel_sizes is not None and is_coarse(voxel_sizes):
        sizes = " x ".join(f"{v:.2g}" for v in voxel_sizes)
        warnings.append(f"voxels of {sizes} mm are coarser than the 1-{MAX_VOXEL_MM:g} mm psc is validated on: "
                        "thin structures (CSF, cortex) are unreliable; check the QC picture")
    counts = np.bincount(np.asarray(labels).ravel(), minlength=max(names) + 1)
    litres = lambda voxels: float(voxels) * voxel_volume / 1e6  # noqa: E731
    gm, wm = _label(names, "GM"), _label(names, "WM")
    if gm is not None and wm is not None:
        tissue = litres(counts[gm] + counts[wm])
        low, high = TISSUE_LITRES
        if not low <= tissue <= high:
            hint = "a whole head or background labelled as brain? (try --skull-strip on)" if tissue > high else \
                "part of the brain missing, a child's brain or strong atrophy?"
            warnings.append(f"GM+WM is {tissue:.2f} L, outside the adult range {low}-{high} L: {hint}")
        if counts[wm]:
            ratio = counts[gm] / counts[wm]
            low, high = GM_WM_RATIO
            if not low <= ratio <= high:
                warnings.append(f"GM/WM ratio is {ratio:.2f}, outside the adult range {low}-{high}")
        elif counts[gm]:
            warnings.append("no WM labelled at all")
        csf = _label(names, "CSF")
        if csf is not None and counts[gm] + counts[wm]:
            fraction = counts[csf] / (counts[gm] + counts[wm])
            if fraction < MIN_CSF_FRACTION:
                warnings.append(f"CSF is {litres(counts[csf]) * 1000:.1f} ml, {100 * fraction:.2f} % of GM+WM (adult "
                                f"ventricles alone are at least {100 * MIN_CSF_FRACTION:g} %): ventricles missed?")
    on_border = border_fraction(labels)
    if on_border > MAX_BORDER_FRACTION:
        warnings.append(f"{100 * on_border:.1f} % of the labelled voxels lie on the image border "
                        "(a brain does not fill its field of view: skull, neck or background labelled?)")
    if brain is not None:
        volume = litres(int((np.asarray(brain) > 0).sum()))
        low, high = INTRACRANIAL_LITRES
        if not low <= volume <= high:
            warnings.append(f"the brain mask is {volume:.2f} L, outside the adult intracranial range {low}-{high} L")
    return warnings
