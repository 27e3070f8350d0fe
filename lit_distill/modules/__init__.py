"""LightningModules for the three ways one LLM trains another."""

from .base import DistillationModule
from .co_distillation import CoDistillation
from .hard_label import HardLabelDistillation
from .language_model import LanguageModelTraining
from .soft_label import SoftLabelDistillation

__all__ = [
    "CoDistillation",
    "DistillationModule",
    "HardLabelDistillation",
    "LanguageModelTraining",
    "SoftLabelDistillation",
]
