"""Whether Qt can open a display here, asked once: the GUI tests (napari widgets) skip
without one instead of letting Qt abort the whole test run. Imported by the test
modules as a plain module (pytest puts tests/ on sys.path)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest


@functools.lru_cache(maxsize=1)
def qt_can_start() -> bool:
    """A QApplication starts in a child process (Qt aborts the process when it cannot
    reach a display, which must not take the test run with it)."""
    if sys.platform.startswith("linux") and not any(
            os.environ.get(v) for v in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")):
        return False
    probe = "from qtpy.QtWidgets import QApplication; QApplication([])"
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# Decided at collection, before any fixture (make_napari_viewer, qtbot) starts Qt.
needs_display = pytest.mark.skipif("not __import__('display').qt_can_start()",
                                   reason="no display for Qt (install xvfb; pytest-xvfb starts it)")
