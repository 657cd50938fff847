"""Fixtures shared by the napari plugin tests (test_napari_*.py): psc's MRI outputs on
disk and a small EM run, each made once per session."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest


@pytest.fixture(scope="session")
def mri_outputs(tmp_path_factory):
    """``sub.nii.gz`` on an oblique grid, with ``sub_dseg.nii.gz`` (+ .tsv) and
    ``sub_probseg.nii.gz`` written by psc's own output writer."""
    from mri_fixtures import brain_phantom, oblique_affine, save_nifti
    from psc.pipelines.mri.config import LABELS
    from psc.pipelines.mri.inference import Segmentation
    from psc.pipelines.mri.io import read_scan
    from psc.pipelines.mri.outputs import output_paths, write_outputs

    folder = tmp_path_factory.mktemp("napari_mri")
    image, truth = brain_phantom((36, 30, 34))
    affine = oblique_affine()
    scan_path = save_nifti(folder / "sub.nii.gz", image, affine)
    probabilities = np.stack([truth == c for c in range(4)]).astype(np.float32)
    paths = output_paths(scan_path, None, probabilities=True)
    write_outputs(Segmentation(truth, probabilities), read_scan(scan_path), paths, dict(LABELS))
    return SimpleNamespace(folder=folder, scan=scan_path, image=image, truth=truth, affine=affine, **paths)


@pytest.fixture(scope="session")
def em_run(tmp_path_factory):
    """A synthetic raw container (``raw`` + ``labels``), a tiny untrained affinity model,
    and the EM run ``raw_psc.zarr`` made from them with lookup tables at 0.1 and 0.5."""
    from em_fixtures import synthetic_raw, tiny_weights
    from psc.pipelines.em.run import prepare, run

    folder = tmp_path_factory.mktemp("napari_em")
    raw, _, labels = synthetic_raw(folder)
    weights = tiny_weights(folder)
    out = folder / "raw_psc.zarr"
    prepare(str(raw / "raw"), out, weights, block_size=(16, 24, 20), thresholds=(0.1, 0.5), threshold=0.5)
    run(out, workers=0, progress=False)
    return SimpleNamespace(folder=folder, raw=raw, weights=weights, out=out, labels=labels)

