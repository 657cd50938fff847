"""Errors a user can fix (bad input, existing output, unusable weights...): command lines
print them as one line and exit non-zero; anything else is a bug and keeps its traceback.

Every such error is an :class:`InputError` or a subclass of it (``WeightsError`` in
``psc.models.weights``), so ``psc.app.cli.run_guarded`` has exactly one thing to catch."""

from pathlib import Path


class InputError(ValueError):
    pass


NO_SPACE_MARKERS = ("no space left on device", "os error 28", "errno 28", "disk is full", "disk quota exceeded")


FULL_BELOW_BYTES = 1 << 20  # a file system with less free than this is full, for io_error_on_full_disk


def is_disk_full(error: BaseException | None, path: str | Path | None = None) -> bool:
    """Whether ``error``, or an error it was raised from or during, is a full disk
    (:func:`disk_full_error`; with ``path``, also :func:`io_error_on_full_disk`)."""
    return disk_full_error(error) is not None or (path is not None and io_error_on_full_disk(error, path) is not None)


def io_error_on_full_disk(error: BaseException | None, path: str | Path) -> BaseException | None:
    """The I/O error in ``error``'s chain, if the file system holding ``path`` is full.

    SQLite does not always say "disk is full": when its WAL index (``-shm``) or journal
    cannot grow it reports ``SQLITE_IOERR`` ("disk I/O error"), and a file system may
    answer ``EIO``. Such an error while the disk holding the output has under
    :data:`FULL_BELOW_BYTES` free is the full disk, and gets the same one line."""
    import errno
    import shutil

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        code = getattr(error, "sqlite_errorcode", None)
        if (code is not None and code & 0xFF == 10) or (isinstance(error, OSError) and error.errno == errno.EIO):
            folder = Path(path)
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
            try:
                if shutil.disk_usage(folder).free < FULL_BELOW_BYTES:
                    return error
            except OSError:
                return None
        error = error.__cause__ or error.__context__
    return None


def disk_full_error(error: BaseException | None) -> BaseException | None:
    """The error in ``error``'s chain (itself, what it was raised from or during) that
    says the disk is full, or None.

    A full disk reaches a command in many shapes, depending on which layer noticed: an
    ``OSError`` with ``ENOSPC``/``EDQUOT`` (zarr writing a chunk, Python writing a file),
    ``sqlite3.OperationalError`` "database or disk is full" (the region graph), a Rust
    panic from daisy's scheduler ("failed printing to stderr: No space left on device
    (os error 28)"), or a worker's failure carried home as text in a run error. All of
    them mean the same to a user, "free some space and run it again", so they are
    recognised here by errno, SQLite's result code (``SQLITE_FULL``, 13) or, for those
    that only carry text, by the operating system's words."""
    import errno

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        if getattr(error, "sqlite_errorcode", None) == 13:  # SQLITE_FULL
            return error
        if any(marker in str(error).lower() for marker in NO_SPACE_MARKERS):
            return error
        error = error.__cause__ or error.__context__
    return None
