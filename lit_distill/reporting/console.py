"""What a training run need not print: Lightning's and Hugging Face's notices, quieted.

:func:`quiet` removes what every ``Trainer`` and every Hugging Face load prints but nobody reads (the GPU/TPU
availability lines, the litlogger/litmodels tips, a deprecation warning from Lightning's pytree helper, weight
loading and writing bars). ``lit-distill`` and the demo call it; a script that calls ``Trainer.fit`` itself can
too, with :class:`~lit_distill.reporting.progress.StepProgressBar`::

    from lit_distill.reporting import StepProgressBar, quiet

    quiet()
    trainer = Trainer(max_steps=1000, callbacks=[StepProgressBar()])
"""

from __future__ import annotations

import logging
import re
import warnings

# Informational lines of every Trainer that say nothing about the run (the GPU line appears as "GPU available:
# True (cuda), used: True"; the warning "GPU available but not used" is kept).
NOISE = re.compile(r"^(GPU available: |TPU available: |💡 Tip: )")
RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not NOISE.match(str(record.getMessage()))


_FILTER = _DropNoise()


def quiet() -> None:
    """Silence the notices every run prints: Lightning's GPU/TPU availability lines and product tips, the
    deprecation warning of Lightning's pytree helper under recent PyTorch, and Hugging Face's progress bars
    for loading and writing weights. Warnings about the run itself stay. Idempotent; affects the process."""
    for name in RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
    )
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover
        pass
