"""The per-row epilogue both backends share: targets, masking, the alpha mix, reductions and statistics.

A backend computes, for every row (token), seven statistics in one streaming pass over the vocabulary:
the divergence ``D`` at temperature T, the student's and the teacher's log-sum-exp at T=1 as a max and a
max-shifted log-sum-exp, and both argmaxes (:class:`RowStatistics`). Everything else (hard cross-entropy,
teacher cross-entropy, masking, reduction, the detached statistics of :class:`DistillationOutput`, the
per-row gradient scale) needs only O(N) work and lives here, so the two backends cannot disagree on it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .options import LossOptions


class DistillationOutput(NamedTuple):
    """Result of a distillation loss call.

    Attributes:
        loss: ``alpha * soft + (1 - alpha) * hard + teacher_ce_weight * teacher_ce`` reduced as asked
            (a scalar, or the leading shape for ``reduction="none"``). The only field with a gradient.
        soft: mean over counted tokens of the soft term (the divergence, times T² when ``t2_scaling``).
        hard: mean over counted tokens of the student's cross-entropy at T=1 on the hard labels (with
            ``label_weight`` w and ``hard_labels="teacher_argmax"``, ``(1 - w) CE(argmax) + w CE(labels)``;
            NaN when there are no hard labels: ``hard_labels="labels"`` and ``labels=None``).
        teacher_ce: mean over counted tokens of the teacher's cross-entropy at T=1 on ``labels``
            (NaN without labels).
        agreement: fraction of counted tokens where the student's and the teacher's argmax agree.
        num_tokens: number of counted tokens (int64 tensor).
    """

    loss: torch.Tensor
    soft: torch.Tensor
    hard: torch.Tensor
    teacher_ce: torch.Tensor
    agreement: torch.Tensor
    num_tokens: torch.Tensor


class RowStatistics(NamedTuple):
    """What a backend computes per row in its streaming pass (float tensors are fp32, or fp64 for fp64 input).

    Attributes:
        divergence: ``[N]`` divergence D(p, q) at temperature T, without the T² factor.
        student_max: ``[N]`` max of the student's valid logits at T=1.
        student_log_sum: ``[N]`` log sum exp(s - student_max) over the student's valid logits at T=1.
        teacher_max: ``[N]`` max of the teacher's valid logits at T=1.
        teacher_log_sum: ``[N]`` log sum exp(t - teacher_max) over the teacher's valid logits at T=1.
        student_argmax: ``[N]`` int64 argmax over the student's valid columns.
        teacher_argmax: ``[N]`` int64 argmax over the teacher's valid columns.

    The log-sum-exp is kept in two parts because their sum is rounded at the logits' magnitude: at logits
    near 1e3 an fp32 ulp is 6e-5, more than a confident token's whole cross-entropy.
    """

    divergence: torch.Tensor
    student_max: torch.Tensor
    student_log_sum: torch.Tensor
    teacher_max: torch.Tensor
    teacher_log_sum: torch.Tensor
    student_argmax: torch.Tensor
    teacher_argmax: torch.Tensor


class RowTargets(NamedTuple):
    """Per-row targets and masks derived from the labels (all ``[N]``)."""

    counted: torch.Tensor  # bool: the row contributes to the loss
    hard: torch.Tensor | None  # int64 student CE target (clamped to a valid index on ignored rows)
    teacher: torch.Tensor | None  # int64 teacher CE target (the labels), likewise clamped
    # int64 second student CE target, the labels, with weight opts.label_mix (the first gets 1 - label_mix)
    # when label_weight mixes them into a hard term on the teacher's argmax; else None
    hard_label: torch.Tensor | None = None


def row_targets(
    labels: torch.Tensor | None,
    teacher_argmax: torch.Tensor | None,
    opts: LossOptions,
    num_rows: int,
    device: torch.device,
) -> RowTargets:
    """Counted-row mask and the hard / teacher CE targets; ``teacher_argmax`` is needed only in that mode.

    With ``label_weight`` = 1 the hard target is the labels (the argmax term left out); strictly between 0 and
    1 the labels are also ``hard_label``, the second target of the mix.
    """
    if labels is None:
        counted = torch.ones(num_rows, dtype=torch.bool, device=device)
        safe_labels = None
    else:
        counted = labels != opts.ignore_index
        safe_labels = torch.where(counted, labels, 0)
    hard = teacher_argmax if opts.argmax_target else safe_labels
    hard_label = safe_labels if opts.label_mix > 0 else None
    return RowTargets(counted=counted, hard=hard, teacher=safe_labels, hard_label=hard_label)


class TargetLogits(NamedTuple):
    """``[N]`` logits at the targets, in the compute dtype (None where there is no such target)."""

    student: torch.Tensor | None  # the student's at the hard target
    teacher: torch.Tensor | None  # the teacher's at the label
    student_label: torch.Tensor | None = None  # the student's at the label, for the label_weight mix


def gather_target_logits(
    student: torch.Tensor, teacher: torch.Tensor, targets: RowTargets, dtype: torch.dtype
) -> TargetLogits:
    """The logits at ``targets``: the student's at the hard target(s), the teacher's at the label."""
    s_y = None if targets.hard is None else _gather(student, targets.hard, dtype)
    t_y = None if targets.teacher is None else _gather(teacher, targets.teacher, dtype)
    s_label = None if targets.hard_label is None else _gather(student, targets.hard_label, dtype)
    return TargetLogits(s_y, t_y, s_label)


def finish_rows(
    rows: RowStatistics,
    targets: RowTargets,
    student_target_logit: torch.Tensor | None,
    teacher_target_logit: torch.Tensor | None,
    opts: LossOptions,
    student_label_logit: torch.Tensor | None = None,
) -> tuple[DistillationOutput, torch.Tensor]:
    """Combine per-row statistics into the reduced :class:`DistillationOutput`.

    ``student_target_logit`` / ``teacher_target_logit`` / ``student_label_logit`` are the fields of
    :func:`gather_target_logits`' result; the last is read only when ``opts.label_mix`` > 0.

    Returns the output and the number of counted rows clamped to at least 1 (the mean's divisor, which the
    backward needs again). Runs only O(N) device ops and never syncs with the host.
    """
    dtype = rows.divergence.dtype
    counted = targets.counted
    num_tokens = counted.sum()
    divisor = num_tokens.clamp(min=1).to(dtype)

    def counted_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(counted, x, 0).sum() / divisor

    nan = torch.full_like(rows.divergence, math.nan)
    soft = opts.soft_scale * rows.divergence
    # CE = log sum exp(x - m) - (x_y - m): both terms are small where the loss is, so neither is rounded
    # at the logits' magnitude (x_y - m is exact in floating point when x_y is near m).
    hard = _cross_entropy(rows.student_max, rows.student_log_sum, student_target_logit, nan)
    if opts.label_mix > 0:  # 0 < w < 1: both weights positive, so an infinite term is never multiplied by 0
        w = opts.label_mix
        on_labels = _cross_entropy(rows.student_max, rows.student_log_sum, student_label_logit, nan)
        hard = (1.0 - w) * hard + w * on_labels
    teacher_ce = _cross_entropy(rows.teacher_max, rows.teacher_log_sum, teacher_target_logit, nan)

    # alpha = 0 leaves the soft term out (0 * inf would be NaN), as alpha = 1 leaves out the hard one.
    loss = opts.alpha * soft if opts.alpha > 0 else torch.zeros_like(soft)
    if opts.alpha < 1.0:
        loss = loss + (1.0 - opts.alpha) * hard
    if opts.teacher_ce_weight > 0:
        loss = loss + opts.teacher_ce_weight * teacher_ce
    # where, not multiply: an ignored row's garbage (even inf) must count for nothing.
    loss = torch.where(counted, loss, 0)
    if opts.reduction == "mean":
        loss = loss.sum() / divisor
    elif opts.reduction == "sum":
        loss = loss.sum()

    agree = (rows.student_argmax == rows.teacher_argmax).to(dtype)
    output = DistillationOutput(
        loss=loss,
        soft=counted_mean(soft),
        hard=counted_mean(hard),
        teacher_ce=counted_mean(teacher_ce),
        agreement=counted_mean(agree),
        num_tokens=num_tokens,
    )
    return output, divisor


def _cross_entropy(row_max, log_sum, target_logit, nan):
    return nan if target_logit is None else log_sum - (target_logit - row_max)


def _gather(logits: torch.Tensor, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return logits.gather(1, index.unsqueeze(1)).squeeze(1).to(dtype)


def forward_row_scale(counted: torch.Tensor, divisor: torch.Tensor, reduction: str) -> torch.Tensor:
    """The part of ``row_grad_scale`` known before ``grad_output``: the mean's 1/N, and 0 on ignored rows."""
    one = torch.ones((), dtype=divisor.dtype, device=divisor.device)
    return row_grad_scale(one, counted, divisor, "sum" if reduction == "none" else reduction)


def row_grad_scale(
    grad_loss: torch.Tensor, counted: torch.Tensor, divisor: torch.Tensor, reduction: str
) -> torch.Tensor:
    """``[N]`` factor turning per-row loss gradients into gradients of the reduced loss (0 on ignored rows)."""
    grad_loss = grad_loss.to(divisor.dtype)
    if reduction == "mean":
        scale = grad_loss / divisor
    elif reduction == "sum":
        scale = grad_loss
    else:
        scale = grad_loss.reshape(-1)
    return torch.where(counted, scale.expand(counted.shape), 0)
