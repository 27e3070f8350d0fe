"""Distillation losses over full-vocabulary logits: the hot path, importing nothing from Lightning.

Where things live: ``functional.py`` (the public functions), ``options.py`` (the loss keywords),
``inputs.py`` (argument checks), ``rows.py`` (the per-row epilogue both backends share), ``backend.py``
(Triton or PyTorch), ``triton_backend.py`` and ``torch_backend.py`` (the two backends), ``fused_linear.py``
(the token-chunked lm_head projection). Nothing imports Triton until a Triton call is made.
"""

from .backend import triton_available
from .functional import distillation_loss, fused_linear_distillation_loss
from .options import DIVERGENCES, REDUCTIONS
from .rows import DistillationOutput
from .sparse import fused_linear_sparse_distillation_loss, sparse_distillation_loss

__all__ = [
    "DIVERGENCES",
    "REDUCTIONS",
    "DistillationOutput",
    "distillation_loss",
    "fused_linear_distillation_loss",
    "fused_linear_sparse_distillation_loss",
    "sparse_distillation_loss",
    "triton_available",
]
