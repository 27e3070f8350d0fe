"""Lightning callbacks: hyperparameter schedules for the distillation loss, model export, Ctrl-C checkpoints."""

from .export import ExportModel
from .interrupt import CheckpointOnInterrupt
from .schedules import AlphaScheduler, HyperparameterSchedule, TemperatureScheduler

__all__ = ["AlphaScheduler", "CheckpointOnInterrupt", "ExportModel", "HyperparameterSchedule", "TemperatureScheduler"]
