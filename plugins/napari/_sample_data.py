"""Sample data (File > Open Sample > psc): a T1 brain and a synthetic EM cube, both made
or shipped locally (nothing is downloaded)."""

from __future__ import annotations

from ._reader import LayerData, read_mri

EM_SHAPE = (64, 128, 128)
EM_VOXEL_NM = (8.0, 8.0, 8.0)


def t1_brain() -> list[LayerData]:
    """The MNI152 2009a T1 template that nilearn ships (the input of psc-segment --sample)."""
    from psc.pipelines.mri.sample import sample_t1_path

    data, meta, kind = read_mri(sample_t1_path())[0]
    return [(data, {**meta, "name": "MNI152 T1"}, kind)]


def em_cube() -> list[LayerData]:
    """A synthetic FIB-SEM-like cube (Voronoi cells with dark membranes, 8 nm voxels)
    and its exact cell labels, to try the EM pipeline and the Score widget on."""
    from psc.pipelines.em.synthetic import make_em_volume

    raw, labels = make_em_volume(EM_SHAPE, cell_size=20, seed=0)
    common = {"scale": EM_VOXEL_NM, "translate": (0.0, 0.0, 0.0), "units": "nm", "axis_labels": ("z", "y", "x")}
    return [
        (raw, {**common, "name": "synthetic EM", "contrast_limits": (0, 255), "colormap": "gray",
               "metadata": {"psc": {"kind": "em", "role": "raw"}}}, "image"),
        (labels, {**common, "name": "synthetic EM labels", "opacity": 0.4, "visible": False,
                  "metadata": {"psc": {"kind": "em", "role": "gt"}}}, "labels"),
    ]
