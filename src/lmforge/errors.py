"""The one exception type lmforge raises for bad user input.

``LmforgeError`` subclasses ``ValueError``; the CLI prints its message on one line and exits
with status 2, never a traceback. Internal invariants use ``assert`` instead.
"""


class LmforgeError(ValueError):
    """A problem with what the user asked for: a file, a field, a value out of range."""
