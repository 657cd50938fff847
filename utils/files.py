"""Writing files so that a crash, a full disk or Ctrl-C never leaves a half-written one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into
    place: a crash never leaves a half-written file. The temporary keeps the final
    suffixes (``.nii.gz``) so writers that choose a format by name choose right."""
    path = Path(path)
    suffix = "".join(Path(path.name).suffixes[-2:])
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or ".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; shared outputs must be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
