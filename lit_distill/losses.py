"""``nn.Module`` wrappers around the functional losses, holding their keywords as attributes."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .kernels import DistillationOutput, distillation_loss, fused_linear_distillation_loss
from .kernels.options import LOSS_KEYWORDS, LossOptions, loss_keywords


@loss_keywords
class DistillationLoss(nn.Module):
    """Distillation loss with its options as attributes, so callbacks can change them between steps.

    Callbacks (alpha or temperature schedules) set ``loss.alpha`` / ``loss.temperature``; the new value is
    validated at the next call. See :func:`lit_distill.kernels.distillation_loss` for the math.

    Args:
        **options: the loss options, the fields of :class:`~lit_distill.kernels.options.LossOptions`.

    Raises:
        ValueError, TypeError: on invalid options, at construction.

    Example:
        >>> loss_fn = DistillationLoss(divergence="reverse_kl", temperature=2.0, alpha=0.5)
        >>> s, t, y = torch.randn(8, 100, requires_grad=True), torch.randn(8, 100), torch.randint(100, (8,))
        >>> loss_fn(s, t, y).loss.backward()
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        LossOptions(**options)  # invalid options fail here, not at the first step
        for name, value in options.items():
            setattr(self, name, value)

    def options(self) -> dict[str, Any]:
        """The loss keywords as they are now (a callback may have changed some since construction)."""
        return {name: getattr(self, name) for name in LOSS_KEYWORDS}

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
        options = {**self.options(), **overrides}
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
        options = {**self.options(), **overrides}
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
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())
