"""The top-level folders are installed as ``psc.*``: every Python package folder must
be listed in pyproject, or ``pip install .`` silently leaves it out."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    listed = set(config["packages"])
    found = set()
    for name, folder in mapping.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *relative)))
    assert found == listed, f"in the tree but not in pyproject: {found - listed}; listed but absent: {listed - found}"


def test_public_names_import_under_the_psc_namespace():
    import psc.models as models

    for name in ("PmSCn", "make_conv", "build_model", "list_models", "replace_conv3d", "decompose_conv3d"):
        assert hasattr(models, name), name
