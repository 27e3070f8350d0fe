"""lit-distill: LLM knowledge distillation as PyTorch Lightning modules, with fused Triton kernels."""

from .kernels import DistillationOutput, distillation_loss, fused_linear_distillation_loss
from .losses import DistillationLoss

__version__ = "0.1.0"
__all__ = [
    "DistillationLoss",
    "DistillationOutput",
    "__version__",
    "distillation_loss",
    "fused_linear_distillation_loss",
]
