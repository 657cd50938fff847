"""Writing files so that a crash, a full disk or Ctrl-C never leaves a half-written one,
and a set of files (one scan's outputs) appears together or, after Ctrl-C, not at all.

Every temporary is hidden, beside its file, and named ``.<name>.psc-tmp-<pid>-<random>``
(plus the file's own suffixes), so that a later run can recognise what a killed process
left behind (``stale_temporaries``) and tell it from what a live run is still writing."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

TEMP_MARK = ".psc-tmp-"
# A set's temporaries live only while its files are written (seconds); one this old was
# left by a run that died, whatever its pid says (a pid reused, another machine on NFS).
STALE_AFTER_S = 3600.0
STARTED = time.time()  # this process's start, near enough: psc imports this module early

Writer = Callable[[str], None]


def temporary_for(path: Path) -> Path:
    """A new, empty, hidden temporary beside ``path``, named after it and this process.
    It keeps the final suffixes (``.nii.gz``) so writers that choose a format by name
    choose right."""
    path = Path(path)
    suffix = "".join(Path(path.name).suffixes[-2:]) or ".tmp"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TEMP_MARK}{os.getpid()}-", suffix=suffix)
    os.close(fd)
    return Path(tmp)


def _make_readable(tmp: Path) -> None:
    """mkstemp makes 0600; outputs are shared, so give them the umask's usual mode."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def atomic_write(path: Path, write: Writer) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into
    place: a crash never leaves a half-written file."""
    path = Path(path)
    tmp = temporary_for(path)
    try:
        write(str(tmp))
        _make_readable(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block is done, then deliver it: the renames of a set
    are not cut in two by a keypress. A Python-level handler, not a signal mask, since the
    signal may reach any thread (torch's, rich's) while Python raises it in the main one;
    outside the main thread handlers cannot be changed and the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous != signal.SIG_IGN:
                signal.raise_signal(signal.SIGINT)


def write_set(files: Sequence[tuple[Path, Writer]], remove: Iterable[Path] = ()) -> None:
    """Write ``files`` (path, ``write(tmp)``) as one set: all are written to temporaries
    first and renamed into place only once every one is written, in quick succession.

    The last file is the set's commit marker. An existing marker is deleted before the
    first rename and the new one renamed last, so whoever finds the marker finds a
    complete set, even after a kill in the middle of the renames (which no file system
    makes atomic). ``remove``: files of a previous set that this one does not rewrite,
    deleted in the same step, so what is on disk is one set. On any exception, Ctrl-C
    included, the temporaries are deleted and nothing is renamed; Ctrl-C during the
    renames waits until they are done (``interrupts_held``)."""
    if not files:
        return
    targets = {Path(path) for path, _ in files}
    written: list[tuple[Path, Path]] = []
    try:
        for path, write in files:
            tmp = temporary_for(Path(path))
            written.append((tmp, Path(path)))
            write(str(tmp))
            _make_readable(tmp)
        with interrupts_held():
            Path(files[-1][0]).unlink(missing_ok=True)
            for old in remove:
                if Path(old) not in targets:
                    Path(old).unlink(missing_ok=True)
            for tmp, path in written:
                os.replace(tmp, path)
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise


def temporary_owner(name: str) -> int | None:
    """The pid in a temporary's name (``.x.nii.gz.psc-tmp-<pid>-...``), else None."""
    _, mark, rest = name.partition(TEMP_MARK)
    digits = rest.split("-", 1)[0]
    return int(digits) if mark and digits.isdigit() and int(digits) > 0 else None


def _process_alive(pid: int) -> bool:
    """Whether ``pid`` runs on this machine. Only asked on POSIX, where signal 0 is a
    pure check (on Windows ``os.kill`` would end the process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def is_stale(tmp: Path) -> bool:
    """A temporary no running process is writing: its pid is gone, or it is this
    process's pid but older than this process (a container reuses pid 1 every run), or
    it is older than ``STALE_AFTER_S`` whatever its pid."""
    try:
        modified = tmp.stat().st_mtime
    except FileNotFoundError:
        return False
    pid = temporary_owner(tmp.name)
    if pid is None or time.time() - modified > STALE_AFTER_S:
        return True
    if pid == os.getpid():
        return modified < STARTED
    return os.name == "posix" and not _process_alive(pid)


def stale_temporaries(path: Path) -> list[Path]:
    """The stale temporaries of ``path`` beside it (``is_stale``), its own and those of
    writers that themselves write through a temporary (``..x.psc-tmp-1-a.psc-tmp-1-b``)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = f"{path.name}{TEMP_MARK}"
    return sorted(p for p in path.parent.iterdir()
                  if p.name.startswith(".") and p.name.lstrip(".").startswith(prefix) and is_stale(p))


def remove_stale_temporaries(paths: Iterable[Path]) -> list[Path]:
    """Delete what killed runs left while writing ``paths``; returns what was deleted."""
    removed = [tmp for path in paths for tmp in stale_temporaries(path)]
    for tmp in removed:
        tmp.unlink(missing_ok=True)
    return removed
