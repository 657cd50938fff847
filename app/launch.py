"""The console scripts' entry points (``[project.scripts]`` in pyproject.toml).

A console script imports its entry point's module before calling it, and psc's command
modules import numpy, torch and monai at the top: seconds in which Ctrl-C used to print a
traceback. Worse, a KeyboardInterrupt raised inside a C extension's initialisation is
turned into an ImportError by some of them (numpy's: "Importing the numpy C-extensions
failed"), so catching it is not enough. Each entry point here therefore imports its
command's module with a SIGINT handler that exits at once (nothing has started, nothing
needs cleaning up), then runs ``main()`` under the usual KeyboardInterrupt handling
(``cli.run_guarded``): Ctrl-C anywhere, start-up included, is one ``PROG: interrupted``
line and exit code 130. This module and ``cli`` import only the standard library, since
whatever they import runs before the guard."""

from __future__ import annotations

import importlib
import os
import signal
import sys
from contextlib import contextmanager
from typing import Iterator

from psc.app.cli import INTERRUPTED, interrupted


@contextmanager
def exit_at_once_on_ctrl_c(prog: str) -> Iterator[None]:
    """While importing: Ctrl-C prints its line and ends the process with 130 there and
    then, raising nothing a library could catch or rename."""
    def handler(signum, frame):
        interrupted(prog)
        sys.stderr.flush()
        os._exit(INTERRUPTED)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def launch(prog: str, module: str) -> int:
    """Import ``module`` (``exit_at_once_on_ctrl_c``) and run its ``main()``, where
    Ctrl-C exits 130 too. Once the command is over (the process only exits now), further
    Ctrl-Cs are ignored, so an impatient second one cannot print a traceback from the
    interpreter's shutdown."""
    try:
        with exit_at_once_on_ctrl_c(prog):
            main = importlib.import_module(module).main
        return main()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return interrupted(prog)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def models() -> int:
    return launch("psc-models", "psc.app.models_table")


def segment() -> int:
    return launch("psc-segment", "psc.app.segment")


def evaluate() -> int:
    return launch("psc-eval", "psc.app.evaluate")


def train() -> int:
    return launch("psc-train", "psc.app.train")


def convert() -> int:
    return launch("psc-convert", "psc.app.convert")


def worker() -> int:
    return launch("psc-worker", "psc.app.worker")


def view() -> int:
    return launch("psc-view", "psc.app.view")
