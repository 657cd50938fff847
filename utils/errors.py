"""Errors a user can fix (bad input, existing output, unusable weights...): command lines
print them as one line and exit non-zero; anything else is a bug and keeps its traceback.

Every such error is an :class:`InputError` or a subclass of it (``WeightsError`` in
``psc.models.weights``), so ``psc.app.cli.run_guarded`` has exactly one thing to catch."""


class InputError(ValueError):
    pass
