"""The layering of docs/architecture.md holds in the code: imports run one way,
``utils`` <- ``models`` <- ``pipelines`` <- ``plugins`` <- ``app`` (``psc-view`` calls the
plugin's viewer; the plugin never reaches into the command lines), and the shipped
weights are named in one place only."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"utils": 0, "models": 1, "pipelines": 2, "plugins": 3, "app": 4}


def psc_imports(path: Path) -> set[str]:
    """The psc layers a module imports (absolute ``psc.X`` and relative imports that
    climb out of its own layer)."""
    tree = ast.parse(path.read_text())
    layer = path.relative_to(ROOT).parts[0]
    depth = len(path.relative_to(ROOT / layer).parts) - 1  # 0 for a module at the layer's top
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level and node.level > depth + 1:
                found.add("outside")  # a relative import above the layer's own package
            if node.level == 0 and node.module:
                names = [node.module]
        found |= {name.split(".")[1] for name in names if name.startswith("psc.") and name.count(".") >= 1}
    return found


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_imports_run_one_way(layer):
    offenders = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for imported in psc_imports(path):
            if imported == "outside" or LAYERS.get(imported, 99) > LAYERS[layer]:
                offenders.append(f"{path.relative_to(ROOT)} imports psc.{imported}")
    assert not offenders, "\n".join(offenders)


def test_the_shipped_weight_files_are_named_only_by_the_registry():
    shipped = [p.name for p in (ROOT / "models" / "pretrained").glob("*.pt")]
    assert shipped
    offenders = []
    for folder in ("utils", "models", "pipelines", "plugins", "app", "docker"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "shipped.py":
                continue
            text = path.read_text()
            offenders += [f"{path.relative_to(ROOT)} names {name}" for name in shipped
                          if re.search(re.escape(name), text)]
    assert not offenders, "\n".join(offenders)
