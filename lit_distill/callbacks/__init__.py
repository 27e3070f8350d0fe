"""Lightning callbacks: loss schedules (alpha, temperature), model export, Ctrl-C checkpoints, tokens per second,
the teacher's scores of the student's own samples at validation, and a moving average of the student's weights."""

from ..reporting.throughput import TokensPerSecond
from .averaging import StudentEMA
from .export import ExportModel
from .interrupt import CheckpointOnInterrupt
from .sample_quality import OnPolicyEvaluation
from .schedules import AlphaScheduler, HyperparameterSchedule, LmbdaScheduler, TemperatureScheduler

__all__ = [
    "AlphaScheduler",
    "CheckpointOnInterrupt",
    "ExportModel",
    "HyperparameterSchedule",
    "LmbdaScheduler",
    "OnPolicyEvaluation",
    "StudentEMA",
    "TemperatureScheduler",
    "TokensPerSecond",
]
