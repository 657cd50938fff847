"""Native libraries that print on the process's own file descriptors (waterz's C++ core
on stdout, torch's profiler on stderr) bypass Python's ``sys.stdout``; the only way to
keep them out of a user's terminal or a printed table is to point the descriptor itself
at /dev/null for a while."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager


@contextmanager
def silenced(fd: int):
    """Send file descriptor ``fd`` (1: stdout, 2: stderr) to /dev/null inside the block."""
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
