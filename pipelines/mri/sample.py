"""The bundled default input: the MNI152 2009a T1 template, skull-stripped, that
nilearn ships inside its package (no download)."""

from __future__ import annotations

from pathlib import Path


def sample_t1_path() -> Path:
    import nilearn

    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(f"nilearn's MNI152 template is missing: {path}")
    return path
