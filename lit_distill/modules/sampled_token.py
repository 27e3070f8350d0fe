"""The sampled-token estimator of on-policy distillation: the reverse KL from the sampled tokens' log-probabilities."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import DistillationOutput
from ..losses import DistillationLoss
from .distillation import _forward, _logits


def sampled_token_reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tokens: torch.Tensor, loss: DistillationLoss
) -> DistillationOutput:
    """Reverse KL estimated from ``(M, V)`` logits at the sampled ``(M,)`` tokens, summed over the M tokens.

    With ``r = log q(y) - log p(y)`` at the loss's temperature, the loss is ``T² Σ [r + sg(r) (log q - sg(log
    q))]`` (T² with ``t2_scaling``): its value is the estimate ``T² Σ r`` and its gradient ``T² Σ r ∇log q``,
    whose expectation over ``y ~ q`` is the reverse KL's gradient. ``hard`` and ``teacher_ce`` are the
    student's and the teacher's mean negative log-likelihood of the tokens at T=1.
    """
    vocab = loss.vocab_size or student_logits.shape[-1]
    student_logits, teacher_logits = student_logits[:, :vocab].float(), teacher_logits[:, :vocab].float()
    temperature = loss.temperature
    log_q = -F.cross_entropy(student_logits / temperature, tokens, reduction="none")
    log_p = -F.cross_entropy(teacher_logits / temperature, tokens, reduction="none")
    estimate = (log_q - log_p).detach()
    scale = temperature**2 if loss.t2_scaling else 1.0
    summed = scale * (estimate + estimate * (log_q - log_q.detach())).sum()
    count = tokens.new_tensor(tokens.numel())
    divisor = max(tokens.numel(), 1)
    with torch.no_grad():
        hard = F.cross_entropy(student_logits, tokens, reduction="sum") / divisor
        teacher_ce = F.cross_entropy(teacher_logits, tokens, reduction="sum") / divisor
        agreement = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().sum() / divisor
    nan = torch.full((), math.nan, device=summed.device)
    soft = scale * estimate.sum() / divisor if tokens.numel() else nan
    return DistillationOutput(summed, soft, hard, teacher_ce, agreement, count)


def counted_logits(
    model: nn.Module, head: nn.Linear | None, input_ids: torch.Tensor, mask: torch.Tensor | None, counted: torch.Tensor
) -> torch.Tensor:
    """``(M, V)`` next-token logits at the counted positions only (from the hidden states where the head allows)."""
    out = _forward(model, head, input_ids, mask)
    if head is None:
        return _logits(out)[:, :-1][counted]
    hidden, weight, bias = out
    return F.linear(hidden[:, :-1][counted], weight, bias)
