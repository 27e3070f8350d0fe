"""The public loss functions: validate the options once, check and flatten the inputs, pick a backend.

``distillation_loss`` runs the fused Triton kernels (``triton_backend.py``) for CUDA tensors when Triton is
importable, and the chunked PyTorch path (``torch_backend.py``) otherwise. The Triton module is imported only
when a Triton call is made, so ``import lit_distill`` works on machines without a GPU.
``fused_linear_distillation_loss`` (the same loss from hidden states and lm_head weights) lives in
``fused_linear.py`` and is re-exported here.
"""

from __future__ import annotations

from typing import Any

import torch

from .backend import use_triton
from .fused_linear import fused_linear_distillation_loss
from .inputs import flatten_inputs
from .options import LossOptions, loss_keywords
from .rows import DistillationOutput
from .torch_backend import torch_distillation_loss

__all__ = ["distillation_loss", "fused_linear_distillation_loss"]


@loss_keywords
def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    **options: Any,
) -> DistillationOutput:
    """Distillation loss between student and teacher logits, without materializing softmaxes.

    Per counted token, with ``p = softmax(teacher / T)`` and ``q = softmax(student / T)``:
    ``loss = alpha * soft + (1 - alpha) * hard + teacher_ce_weight * teacher_ce``, where ``soft`` is the
    divergence (times T² when ``t2_scaling``), ``hard`` the student's cross-entropy at T=1 on the hard
    labels and ``teacher_ce`` the teacher's cross-entropy at T=1 on ``labels`` (the only term whose gradient
    reaches the teacher's logits).

    Non-finite inputs, the same on either backend:

    - A ``-inf`` logit on one side where the other side has mass makes a divergence that divides by it
      (forward KL and skew 0 for a student's, reverse KL and skew 0 for a teacher's) +inf in that row, and
      that row's student gradient NaN in every column. A column that is ``-inf`` on both sides adds 0.
    - A ``-inf`` logit at the label makes that cross-entropy +inf; its gradient, softmax - onehot, is finite.
    - ``alpha=0`` leaves the soft term out of the loss and its gradient, as ``alpha=1`` leaves out the hard
      term; the ``soft`` statistic still reports it (+inf, or NaN from a NaN teacher). Likewise
      ``label_weight=1`` leaves the cross-entropy on the teacher's argmax out, and 0 the one on the labels.
    - A row whose label is ``ignore_index``, or whose ``grad_output`` is 0, gets exactly 0 gradient, whatever
      its logits hold (+inf, NaN); an ignored row adds 0 to the loss.
    - NaN in a counted row's logits makes the loss NaN wherever a term of the loss reads them.
    - The argmaxes (``agreement``, ``hard_labels="teacher_argmax"``) are of the raw logits, the first index
      of the max as in ``torch.argmax``, at any temperature.

    Args:
        student_logits: ``(..., V_s)`` floating logits; gets a gradient.
        teacher_logits: ``(..., V_t)`` floating logits; ``-inf`` entries (banned tokens) are allowed.
        labels: ``(...)`` integer targets aligned with the logits (already shifted), or None.
            Positions equal to ``ignore_index`` count for nothing.
        **options: the keyword-only loss options, the fields of :class:`~lit_distill.kernels.options.LossOptions`.

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
    opts = LossOptions(**options)
    inputs = flatten_inputs(student_logits, teacher_logits, labels, opts)
    if use_triton(opts.backend, inputs.student):
        from .triton_backend import triton_distillation_loss

        out = triton_distillation_loss(inputs, opts)
    else:
        out = torch_distillation_loss(inputs, opts)
    if opts.reduction == "none":
        out = out._replace(loss=out.loss.reshape(inputs.leading_shape))
    return out
