"""Lightning callbacks: hyperparameter schedules for the distillation loss, model export."""

from .export import ExportModel
from .schedules import AlphaScheduler, HyperparameterSchedule, TemperatureScheduler

__all__ = ["AlphaScheduler", "ExportModel", "HyperparameterSchedule", "TemperatureScheduler"]
