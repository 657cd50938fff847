"""What every psc command line shares."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's line breaks and shows every default."""


def run_guarded(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body: a user error (``InputError``) becomes one ``PROG: error:``
    line and exit code 2, Ctrl-C exit code 130; anything else is a bug and keeps its
    traceback."""
    from psc.utils.errors import InputError

    try:
        return body()
    except InputError as error:
        print(f"{prog}: error: {' '.join(str(error).splitlines())}", file=sys.stderr)  # one line, always
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
