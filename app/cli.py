"""What every psc command line shares: the help formatter, options whose defaults come
from the pipelines' option dataclasses, and ``run_guarded``, through which every entry
point runs. Stdlib only: ``app/launch.py`` imports it before any heavy module."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Iterable


def format_default(value: Any) -> str:
    """A default as a user types it: ``64 64 64`` for a sequence, ``0.25`` for a float."""
    if isinstance(value, (list, tuple)):
        return " ".join(format_default(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def shown_default(action: argparse.Action) -> Any:
    """The default an option's help shows: the one its command fills in after parsing
    (``add_option``), else argparse's own; ``None`` where there is none worth showing
    (none at all, or a flag that is off unless given)."""
    value = getattr(action, "psc_default", action.default)
    if value is None or value is argparse.SUPPRESS or value == "" or not action.option_strings:
        return None
    if action.nargs == 0 and isinstance(value, bool):  # store_true / store_false
        return None
    return value


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and shows each option's default exactly once,
    as ``(default: X)`` at the end of its help. A help string therefore never spells out a
    default itself; an option whose default is a rule rather than a value (``the shipped
    model``) gives that rule as its ``psc_default`` text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        value = shown_default(action)
        if value is None or action.help is argparse.SUPPRESS:
            return text
        return f"{text} (default: {format_default(value).replace('%', '%%')})"


def add_option(container, *flags: str, default: Any = None, **kwargs) -> argparse.Action:
    """An option that parses to ``None`` when it is not given, so a command can tell what
    was given (``given``) and refuse what does not apply, and fills in ``default``
    afterwards (from an options dataclass); its help shows ``default`` once."""
    action = container.add_argument(*flags, default=None, **kwargs)
    action.psc_default = default
    return action


def given(args: argparse.Namespace, names: Iterable[str]) -> list[str]:
    """Those of ``names`` (option dests) given on the command line (``add_option``s)."""
    return [name for name in names if getattr(args, name, None) is not None]


def flag(name: str) -> str:
    """The option spelling of a dest or field name: ``block_size`` -> ``--block-size``."""
    return "--" + name.replace("_", "-")


def filled(args: argparse.Namespace, cls: type, **extra: Any):
    """``cls`` (an options dataclass) from the options given in ``args`` (``add_option``:
    ``None`` when not given) and its own defaults for the rest; lists become tuples."""
    from dataclasses import fields

    values = {}
    for item in fields(cls):
        value = getattr(args, item.name, None)
        if value is not None:
            values[item.name] = tuple(value) if isinstance(value, list) else value
    return cls(**{**values, **extra})


INTERRUPTED = 130  # the shell's code for a command ended by SIGINT (128 + 2)


def interrupted(prog: str) -> int:
    """Ctrl-C: one ``PROG: interrupted`` line and exit code 130. Changes no signal
    handler, since ``main()`` also runs inside other processes (tests, notebooks);
    ``app/launch.py`` ignores a second Ctrl-C while a console script exits."""
    print(f"{prog}: interrupted", file=sys.stderr)
    return INTERRUPTED


def run_guarded(prog: str, body: Callable[[], int]) -> int:
    """Run a command's body: a user error (``InputError``, and its subclasses such as
    ``WeightsError``) becomes one ``PROG: error:`` line and exit code 2, Ctrl-C exit
    code 130 (``interrupted``); anything else is a bug and keeps its traceback. Ctrl-C
    before the body (importing torch, parsing) is caught by ``app/launch.py``."""
    from psc.utils.errors import InputError

    try:
        return body()
    except InputError as error:
        print(f"{prog}: error: {' '.join(str(error).splitlines())}", file=sys.stderr)  # one line, always
        return 2
    except KeyboardInterrupt:
        return interrupted(prog)
