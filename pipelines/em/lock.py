"""The run's lock: one psc-segment (scheduler) per OUT.zarr at a time.

An OS lock (``fcntl.flock``) on ``OUT.zarr/.psc-lock``: the kernel releases it when the
holding process dies, however it dies, so a crashed or killed run never leaves it stuck
and there is no stale-lock guessing. The file holds the holder's pid and host, for the
one-line refusal a second run gets. The lock file itself is never deleted (``--force``
keeps it): removing a locked file would let another process lock a new file of the same
name while the first still runs.

Only the scheduler takes it. Workers (``psc-worker``, ``psc-worker --serve``, daisy's
local worker processes) never do: they serve the run that holds it. daisy starts its
workers with ``subprocess.Popen`` (no fork), and Python's descriptors are not inherited,
so no worker keeps the scheduler's lock alive after the scheduler is gone.

Within one process the lock is re-entrant (``prepare`` and ``run`` take it, and
psc-segment holds it around both), counted per path.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from psc.utils.errors import InputError

LOCK_FILE = ".psc-lock"

_held: dict[str, list] = {}  # resolved lock path -> [fd, depth]
_guard = threading.Lock()


class RunLocked(InputError):
    """Another process holds the run's lock."""


def lock_path(out: str | Path) -> Path:
    return Path(out) / LOCK_FILE


def holder(out: str | Path) -> str:
    """What the lock file says about its holder ("pid N on HOST"), or "unknown"."""
    try:
        text = lock_path(out).read_text().strip()
    except OSError:
        return "unknown"
    return text or "unknown"


@contextmanager
def run_lock(out: str | Path) -> Iterator[None]:
    """Hold the lock of the run in ``out`` (created as a folder if needed) for the
    ``with`` block; refused at once (:class:`RunLocked`, one line naming the holder) when
    another process holds it."""
    path = lock_path(out)
    key = str(path.resolve())
    with _guard:
        if key in _held:
            _held[key][1] += 1
            entry = _held[key]
        else:
            entry = None
    if entry is None:
        Path(out).mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLocked(f"{out} is in use by another psc-segment run ({holder(out)}); "
                                "wait for it to finish or use another -o") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        with _guard:
            _held[key] = [fd, 1]
    try:
        yield
    finally:
        with _guard:
            _held[key][1] -= 1
            fd = _held[key][0] if _held[key][1] == 0 else None
            if fd is not None:
                del _held[key]
        if fd is not None:
            try:
                os.ftruncate(fd, 0)  # no holder any more
            finally:
                os.close(fd)  # releases the flock
