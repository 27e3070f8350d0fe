"""The ``lit-distill`` command line: the console entry (``main.py``), its parser and errors, the LightningCLI
commands (fit/validate/test/predict), ``cache-teacher`` and ``kernels``; ``demo`` dispatches to
:mod:`lit_distill.demo`. The top floor: nothing in the library imports it."""

from .main import cli_main

__all__ = ["cli_main"]
