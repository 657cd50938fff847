"""Errors a user can fix (bad input, existing output...): command lines print them as
one line and exit non-zero; anything else is a bug and keeps its traceback."""


class InputError(ValueError):
    pass
