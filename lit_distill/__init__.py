"""lit-distill: LLM knowledge distillation as PyTorch Lightning modules, with fused Triton kernels.

The kernels (``lit_distill.kernels``) import nothing from Lightning; the modules and callbacks are
imported lazily so that ``import lit_distill`` stays quick.
"""

from .kernels import (
    DistillationOutput,
    distillation_loss,
    fused_linear_distillation_loss,
    fused_linear_sparse_distillation_loss,
    sparse_distillation_loss,
)
from .losses import DistillationLoss

__version__ = "0.1.0"
__all__ = [
    "AlphaScheduler",
    "CausalLM",
    "CausalLMModule",
    "ChatDataModule",
    "CheckpointOnInterrupt",
    "CoDistillation",
    "CrossTokenizerDistillation",
    "CrossTokenizerOnPolicy",
    "DistillationLoss",
    "DistillationModule",
    "DistillationOutput",
    "ExportModel",
    "HardLabelDistillation",
    "LanguageModelTraining",
    "OfflineDistillation",
    "OnPolicyDistillation",
    "OnPolicyEvaluation",
    "PromptDataModule",
    "SoftLabelDistillation",
    "StudentEMA",
    "TemperatureScheduler",
    "TextDataModule",
    "TokensPerSecond",
    "__version__",
    "distillation_loss",
    "fused_linear_distillation_loss",
    "fused_linear_sparse_distillation_loss",
    "sparse_distillation_loss",
]

_LAZY = {
    "AlphaScheduler": "callbacks",
    "CheckpointOnInterrupt": "callbacks",
    "ExportModel": "callbacks",
    "OnPolicyEvaluation": "callbacks",
    "StudentEMA": "callbacks",
    "TemperatureScheduler": "callbacks",
    "TokensPerSecond": "reporting",
    "TextDataModule": "data",
    "ChatDataModule": "data",
    "PromptDataModule": "data",
    "LanguageModelTraining": "modules",
    "CausalLM": "models",
    "CausalLMModule": "modules",
    "CoDistillation": "modules",
    "CrossTokenizerDistillation": "modules",
    "CrossTokenizerOnPolicy": "modules",
    "DistillationModule": "modules",
    "HardLabelDistillation": "modules",
    "OfflineDistillation": "modules",
    "OnPolicyDistillation": "modules",
    "SoftLabelDistillation": "modules",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lit_distill' has no attribute {name!r}")
