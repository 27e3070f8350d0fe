"""Lightning callbacks: hyperparameter schedules for the distillation loss."""

from .schedules import AlphaScheduler, HyperparameterSchedule, TemperatureScheduler

__all__ = ["AlphaScheduler", "HyperparameterSchedule", "TemperatureScheduler"]
