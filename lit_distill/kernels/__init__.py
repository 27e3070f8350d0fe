"""Distillation losses over full-vocabulary logits.

``distillation_loss`` dispatches to the fused Triton kernels (``divergence.py``) for CUDA tensors when
Triton is importable, and to the chunked PyTorch implementation (``reference.py``) otherwise. Nothing here
imports Triton until a Triton call is made, so ``import lit_distill`` works on machines without a GPU.
"""

from __future__ import annotations

import torch

from .common import (
    DIVERGENCES,
    REDUCTIONS,
    DistillationOutput,
    LossOptions,
    flatten_inputs,
    triton_available,
    use_triton,
)
from .fused_linear import fused_linear_distillation_loss
from .reference import reference_distillation_loss

__all__ = [
    "DIVERGENCES",
    "REDUCTIONS",
    "DistillationOutput",
    "distillation_loss",
    "fused_linear_distillation_loss",
    "triton_available",
]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
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
) -> DistillationOutput:
    """Distillation loss between student and teacher logits, without materializing softmaxes.

    Per counted token, with ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``:
    ``loss = alpha * soft + (1 - alpha) * hard + teacher_ce_weight * teacher_ce``, where ``soft`` is the
    divergence (times T² when ``t2_scaling``), ``hard`` the student's cross-entropy at T=1 on the hard
    labels and ``teacher_ce`` the teacher's cross-entropy at T=1 on ``labels`` (the only term whose gradient
    reaches the teacher's logits).

    Args:
        student_logits: ``(..., V_s)`` floating logits; gets a gradient.
        teacher_logits: ``(..., V_t)`` floating logits; ``-inf`` entries (banned tokens) are allowed.
        labels: ``(...)`` integer targets aligned with the logits (already shifted), or None.
            Positions equal to ``ignore_index`` count for nothing.
        divergence: ``forward_kl`` KL(p‖q), ``reverse_kl`` KL(q‖p), ``jsd`` (``beta``; 0 is forward KL and
            1 reverse KL), ``skew_forward_kl`` KL(p‖λp+(1-λ)q) and ``skew_reverse_kl`` KL(q‖λq+(1-λ)p)
            (λ = ``skew``), or ``tvd`` ½Σ|p-q|.
        beta: JSD mixing weight in [0, 1].
        skew: skew λ in [0, 1] of the skew divergences.
        temperature: softmax temperature T > 0 of the soft term.
        t2_scaling: multiply the soft term by T² (Hinton) so its gradient does not shrink with T.
        alpha: weight in [0, 1] of the soft term; the hard term gets ``1 - alpha``.
        hard_labels: ``"labels"`` or ``"teacher_argmax"`` (the teacher's top token as the hard target).
        teacher_ce_weight: weight ≥ 0 of the teacher's cross-entropy (co-distillation).
        vocab_size: number of real tokens; columns at or past it are padding, excluded from both softmaxes.
            Required when the two last dimensions differ.
        ignore_index: label value of positions to skip.
        reduction: ``"mean"`` over counted tokens (0 when there are none), ``"sum"``, or ``"none"``
            (per-position losses in the leading shape, 0 at ignored positions).
        backend: ``"auto"`` (Triton for CUDA tensors, else PyTorch), ``"triton"`` or ``"torch"``.

    Returns:
        :class:`DistillationOutput` ``(loss, soft, hard, teacher_ce, agreement, num_tokens)``; only ``loss``
        carries a gradient, the rest are statistics from the same pass.

    Raises:
        ValueError: on inconsistent shapes, devices, out-of-range options or labels (on CUDA, labels are
            checked by a device-side assert instead, which does not sync the host).
        TypeError: on non-floating logits, non-integer labels or non-numeric options.

    Example:
        >>> s, t = torch.randn(4, 10, 1000, requires_grad=True), torch.randn(4, 10, 1000)
        >>> out = distillation_loss(s, t, divergence="jsd", beta=0.5, temperature=2.0)
        >>> out.loss.backward()
    """
    opts = LossOptions.create(
        divergence=divergence,
        beta=beta,
        skew=skew,
        temperature=temperature,
        t2_scaling=t2_scaling,
        alpha=alpha,
        hard_labels=hard_labels,
        teacher_ce_weight=teacher_ce_weight,
        vocab_size=vocab_size,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown backend {backend!r}; choose one of 'auto', 'triton', 'torch'")
    inputs = flatten_inputs(student_logits, teacher_logits, labels, opts)
    if use_triton(backend, inputs.student):
        from .divergence import triton_distillation_loss

        out = triton_distillation_loss(inputs, opts)
    else:
        out = reference_distillation_loss(inputs, opts)
    if opts.reduction == "none":
        out = out._replace(loss=out.loss.reshape(inputs.leading_shape))
    return out
