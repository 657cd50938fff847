"""Which shipped MRI model segments a scan when ``--weights`` is not given.

Two models ship (``models/shipped.py``), and neither is the better one on every scan
(docs/results-mri.md, "The shipped models"; the 9/2 models of both recipes, scored on
the two IBSR scans neither saw):

* ``MRI_TISSUE`` (basic augmentation, 2000 iterations): mean Dice 0.912 / 0.901 on the
  original 1-1.5 mm scans against 0.886 / 0.875 for the robust recipe, and ahead with a
  bias field and gamma too (0.895 / 0.897 against 0.869 / 0.866);
* ``MRI_TISSUE_COARSE`` (the robust recipe: simulated 1-2 mm voxels and 3-5 mm slices,
  with intensity augmentation): ahead on every coarse variant, 0.79 / 0.65 against 0.59 /
  0.56 at 3 mm, 0.79 / 0.71 against 0.67 / 0.61 with 5 mm axial slices, 0.84 / 0.76
  against 0.83 / 0.70 with 5 mm coronal slices.

So the rule is the voxel size: coarser than 2 mm along any axis (``plausibility.is_coarse``,
the same test as its warning) takes the coarse model; everything else the
default one. Such a scan also warns (coarse voxels): the choice makes it better, not
trustworthy.
"""

from __future__ import annotations

from typing import Sequence

from psc.models.shipped import ShippedWeights, WeightsRecord

from .plausibility import is_coarse


def default_model_for(voxel_sizes: Sequence[float]) -> WeightsRecord:
    """The shipped record that segments a scan with these voxel sizes (mm)."""
    return (ShippedWeights.MRI_TISSUE_COARSE if is_coarse(voxel_sizes) else ShippedWeights.MRI_TISSUE).value
