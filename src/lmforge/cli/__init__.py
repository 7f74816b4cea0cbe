"""The ``lmforge`` command line: ``main`` (the parser in ``main.py``), shared argument groups in ``args.py``,
flags derived from recipe configs in ``options.py``, and one module per command group. No library module
below this package contains argparse code."""

from lmforge.cli.main import main

__all__ = ["main"]
