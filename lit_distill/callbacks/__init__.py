"""Lightning callbacks: loss schedules (alpha, temperature), model export, Ctrl-C checkpoints, tokens per second."""

from .export import ExportModel
from .interrupt import CheckpointOnInterrupt
from .schedules import AlphaScheduler, HyperparameterSchedule, TemperatureScheduler
from .throughput import TokensPerSecond

__all__ = [
    "AlphaScheduler",
    "CheckpointOnInterrupt",
    "ExportModel",
    "HyperparameterSchedule",
    "TemperatureScheduler",
    "TokensPerSecond",
]
