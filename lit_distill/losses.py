"""``nn.Module`` wrappers around the functional losses, holding their keywords as attributes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .kernels import DistillationOutput, distillation_loss, fused_linear_distillation_loss
from .kernels.common import LossOptions


class DistillationLoss(nn.Module):
    """Distillation loss with its options as attributes, so callbacks can change them between steps.

    Callbacks (alpha or temperature schedules) set ``loss.alpha`` / ``loss.temperature``; the new value is
    validated at the next call. See :func:`lit_distill.kernels.distillation_loss` for every keyword.

    Args:
        divergence: ``forward_kl``, ``reverse_kl``, ``jsd``, ``skew_forward_kl``, ``skew_reverse_kl`` or ``tvd``.
        beta: JSD weight in [0, 1].
        skew: skew in [0, 1] of the skew divergences.
        temperature: softmax temperature > 0 of the soft term.
        t2_scaling: multiply the soft term by T².
        alpha: weight of the soft term; the hard cross-entropy gets ``1 - alpha``.
        hard_labels: ``"labels"`` or ``"teacher_argmax"``.
        teacher_ce_weight: weight of the teacher's cross-entropy (co-distillation).
        vocab_size: number of real tokens when heads are padded.
        ignore_index: label value of positions to skip.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Raises:
        ValueError, TypeError: on invalid options, at construction.

    Example:
        >>> loss_fn = DistillationLoss(divergence="reverse_kl", temperature=2.0, alpha=0.5)
        >>> s, t, y = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100), torch.randint(100, (8,))
        >>> loss_fn(s, t, y).loss.backward()
    """

    def __init__(
        self,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        skew: float = 0.1,
        temperature: float = 1.0,
        t2_scaling: bool = True,
        alpha: float = 1.0,
        hard_labels: str = "labels",
        teacher_ce_weight: float = 0.0,
        vocab_size: int | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.divergence = divergence
        self.beta = beta
        self.skew = skew
        self.temperature = temperature
        self.t2_scaling = t2_scaling
        self.alpha = alpha
        self.hard_labels = hard_labels
        self.teacher_ce_weight = teacher_ce_weight
        self.vocab_size = vocab_size
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend
        LossOptions.create(**self._options())
        if backend not in ("auto", "triton", "torch"):
            raise ValueError(f"unknown backend {backend!r}; choose one of 'auto', 'triton', 'torch'")

    def _options(self) -> dict:
        return {
            "divergence": self.divergence,
            "beta": self.beta,
            "skew": self.skew,
            "temperature": self.temperature,
            "t2_scaling": self.t2_scaling,
            "alpha": self.alpha,
            "hard_labels": self.hard_labels,
            "teacher_ce_weight": self.teacher_ce_weight,
            "vocab_size": self.vocab_size,
            "ignore_index": self.ignore_index,
            "reduction": self.reduction,
        }

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        **overrides: Any,
    ) -> DistillationOutput:
        """Loss of ``(..., V)`` student logits against teacher logits; see ``distillation_loss``.

        ``overrides`` replace attributes for this call only (e.g. ``reduction="sum"``).
        """
        options = {**self._options(), "backend": self.backend, **overrides}
        return distillation_loss(student_logits, teacher_logits, labels, **options)

    def fused_linear(
        self,
        student_hidden: torch.Tensor,
        student_weight: torch.Tensor,
        teacher_hidden: torch.Tensor,
        teacher_weight: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        student_bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
        chunk_size: int | None = None,
        **overrides: Any,
    ) -> DistillationOutput:
        """The same loss on ``hidden @ weight.T + bias`` logits without materializing them.

        See :func:`lit_distill.kernels.fused_linear_distillation_loss` for the shapes; ``overrides`` as in
        :meth:`forward`.
        """
        options = {**self._options(), "backend": self.backend, **overrides}
        return fused_linear_distillation_loss(
            student_hidden,
            student_weight,
            teacher_hidden,
            teacher_weight,
            labels,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            chunk_size=chunk_size,
            **options,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in {**self._options(), "backend": self.backend}.items())
