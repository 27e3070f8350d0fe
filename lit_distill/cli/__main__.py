"""``python -m lit_distill.cli``: the same as the ``lit-distill`` console script."""

import sys

from .main import cli_main

sys.exit(cli_main())
