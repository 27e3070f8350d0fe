"""The ``lit-distill`` command.

lit-distill demo [--quick]                      distillation end to end on the bundled corpus
lit-distill fit --config configs/<x>.yaml       train any technique from YAML (LightningCLI)
lit-distill validate|test|predict ...            the other LightningCLI subcommands
lit-distill kernels                             the loss on random logits, Triton kernels vs PyTorch
lit-distill cache-teacher --config <x>.yaml     a teacher's sparse signal over a corpus, for offline distillation
lit-distill prepare --output DIR [--data.* ...]  a corpus or chat data tokenized once, read row by row

``cli_main`` is the console script (it returns the exit status, 0 on success). It imports nothing heavy
before it knows the command: ``kernels`` must ask for Triton's CPU interpreter before anything imports
Triton, and importing Lightning does (through torch). The LightningCLI commands are in ``lightning_cli.py``
(``run_cli`` runs them from Python and returns the CLI object), the parser in ``parser.py``, the reading
of jsonargparse's errors in ``errors.py``, the ``kernels`` command in ``kernels_check.py``, ``cache-teacher``
in ``cache_teacher.py`` and ``prepare`` in ``prepare.py``; the demo is the ``lit_distill.demo`` package.
"""

from __future__ import annotations

import sys


def cli_main(args: list[str] | None = None) -> int:
    """Entry point of the ``lit-distill`` console script: runs the command and returns 0 (the exit status).

    Errors in the options, the configuration or the input (a damaged checkpoint, say) exit with status 2 and
    one message; a run stopped by a NaN or infinite loss exits with status 1 and its message.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["kernels"]:
        from .kernels_check import kernels_main

        kernels_main(argv[1:])
        return 0
    from ..reporting.console import quiet

    quiet()
    if argv[:1] == ["demo"]:
        from ..demo import demo_main

        demo_main(argv[1:])
        return 0
    # From the console LightningCLI reads sys.argv itself (passing both makes it warn).
    from .errors import debug_requested, run_error
    from .lightning_cli import run_cli

    try:
        if argv[:1] == ["cache-teacher"]:
            from .cache_teacher import cache_teacher_main

            cache_teacher_main(argv[1:])
        elif argv[:1] == ["prepare"]:
            from .prepare import prepare_main

            prepare_main(argv[1:])
        else:
            run_cli(None if args is None else argv)
    except Exception as err:  # the library's own message instead of a traceback through Lightning's loops
        stated = None if debug_requested() else run_error(err)
        if stated is None:
            raise
        print(f"lit-distill {argv[0] if argv else ''}: error: {stated[0]}", file=sys.stderr)
        print("  (set JSONARGPARSE_DEBUG=true to see the traceback)", file=sys.stderr)
        return stated[1]
    from ..sharding import close_process_group

    close_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
