"""What a run reports as it goes, shared by the modules, the demo and the command line: quiet console output,
the step progress bar and tokens per second. Imports nothing else from lit_distill."""

from .console import quiet
from .progress import StepProgressBar
from .throughput import TokensPerSecond

__all__ = ["StepProgressBar", "TokensPerSecond", "quiet"]
