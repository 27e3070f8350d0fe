"""What both backends share: option validation, input flattening and the per-row epilogue.

A backend computes, for every row (token), five statistics in one streaming pass over the vocabulary:
the divergence ``D`` at temperature T, the student's and the teacher's log-sum-exp at T=1, and both
argmaxes. Everything else (hard cross-entropy, teacher cross-entropy, masking, reduction, the detached
statistics of :class:`DistillationOutput`) needs only O(N) work and lives here, so the two backends cannot
disagree on it.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
HARD_LABEL_SOURCES = ("labels", "teacher_argmax")


class DistillationOutput(NamedTuple):
    """Result of a distillation loss call.

    Attributes:
        loss: ``alpha * soft + (1 - alpha) * hard + teacher_ce_weight * teacher_ce`` reduced as asked
            (a scalar, or the leading shape for ``reduction="none"``). The only field with a gradient.
        soft: mean over counted tokens of the soft term (the divergence, times T² when ``t2_scaling``).
        hard: mean over counted tokens of the student's cross-entropy at T=1 on the hard labels
            (NaN when there are no hard labels: ``hard_labels="labels"`` and ``labels=None``).
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


@dataclass(frozen=True)
class LossOptions:
    """The validated scalar keywords of ``distillation_loss``.

    ``divergence`` is already resolved: ``jsd`` with beta 0 or 1 becomes ``forward_kl`` / ``reverse_kl``
    (the TRL / Liger convention), and ``mix`` holds the beta or skew that the divergence uses.
    """

    divergence: str
    mix: float
    temperature: float
    t2_scaling: bool
    alpha: float
    hard_labels: str
    teacher_ce_weight: float
    vocab_size: int | None
    ignore_index: int
    reduction: str

    @classmethod
    def create(
        cls,
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
    ) -> LossOptions:
        """Validate the keywords, raising ``ValueError``/``TypeError`` that name the argument and the fix."""
        _choice("divergence", divergence, DIVERGENCES)
        _choice("reduction", reduction, REDUCTIONS)
        _choice("hard_labels", hard_labels, HARD_LABEL_SOURCES)
        beta = _unit_interval("beta", beta)
        skew = _unit_interval("skew", skew)
        alpha = _unit_interval("alpha", alpha)
        temperature = _number("temperature", temperature)
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        teacher_ce_weight = _number("teacher_ce_weight", teacher_ce_weight)
        if not (teacher_ce_weight >= 0 and math.isfinite(teacher_ce_weight)):
            raise ValueError(f"teacher_ce_weight must be a finite number >= 0, got {teacher_ce_weight}")
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
            raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
        if vocab_size is not None and vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")

        mix = {"jsd": beta, "skew_forward_kl": skew, "skew_reverse_kl": skew}.get(divergence, 0.0)
        if divergence == "jsd" and beta in (0.0, 1.0):
            # By convention jsd(beta=0) is forward KL and jsd(beta=1) reverse KL, not the degenerate 0.
            divergence, mix = ("forward_kl" if beta == 0.0 else "reverse_kl"), 0.0
        return cls(
            divergence=divergence,
            mix=mix,
            temperature=temperature,
            t2_scaling=bool(t2_scaling),
            alpha=alpha,
            hard_labels=hard_labels,
            teacher_ce_weight=teacher_ce_weight,
            vocab_size=vocab_size,
            ignore_index=ignore_index,
            reduction=reduction,
        )

    @property
    def soft_scale(self) -> float:
        """Factor on the divergence: T² (Hinton) keeps the soft gradient's size independent of T."""
        return self.temperature**2 if self.t2_scaling else 1.0


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, allowed))}")


def _number(name: str, value: object) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _unit_interval(name: str, value: object) -> float:
    value = _number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


class FlatInputs(NamedTuple):
    """Inputs flattened to rows: logits ``[N, V_s]`` / ``[N, V_t]`` with unit column stride, labels ``[N]``."""

    student: torch.Tensor
    teacher: torch.Tensor
    labels: torch.Tensor | None
    vocab_size: int
    leading_shape: torch.Size


def flatten_inputs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    opts: LossOptions,
) -> FlatInputs:
    """Check tensor arguments against each other and flatten ``(..., V)`` to ``(N, V)``."""
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point (fp32, bf16, fp16 or fp64), got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] == 0:
            raise ValueError(f"{name} must have shape (..., V) with V > 0, got {tuple(x.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits is on {student_logits.device} but teacher_logits on {teacher_logits.device};"
            " move both to the same device"
        )
    lead = student_logits.shape[:-1]
    if teacher_logits.shape[:-1] != lead:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)}"
            " must have the same leading shape (all but the vocabulary dimension)"
        )
    vocab = resolve_vocab_size(student_logits.shape[-1], teacher_logits.shape[-1], opts)
    labels = check_labels(labels, lead, vocab, student_logits.device, opts, what="the logits' leading shape")

    return FlatInputs(
        student=_rows(student_logits),
        teacher=_rows(teacher_logits),
        labels=labels,
        vocab_size=vocab,
        leading_shape=lead,
    )


def resolve_vocab_size(v_s: int, v_t: int, opts: LossOptions) -> int:
    """The number of real tokens: ``opts.vocab_size``, or the common size of both heads."""
    vocab = opts.vocab_size
    if vocab is None:
        if v_s != v_t:
            raise ValueError(
                f"student vocabulary size {v_s} differs from teacher vocabulary size {v_t}; if one head is"
                " padded, pass vocab_size=<number of real tokens> so the padding columns are excluded"
            )
        return v_s
    if vocab > min(v_s, v_t):
        raise ValueError(
            f"vocab_size={vocab} is larger than the student ({v_s}) or teacher ({v_t}) vocabulary dimension"
        )
    return vocab


def check_labels(
    labels: torch.Tensor | None,
    lead: torch.Size,
    vocab: int,
    device: torch.device,
    opts: LossOptions,
    what: str,
) -> torch.Tensor | None:
    """Validate ``labels`` against the inputs' leading shape ``lead`` (described by ``what``) and flatten them."""
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor (e.g. torch.long), got {labels.dtype}")
        if labels.shape != lead:
            raise ValueError(f"labels shape {tuple(labels.shape)} must equal {what} {tuple(lead)}")
        if labels.device != device:
            raise ValueError(f"labels are on {labels.device} but the inputs on {device}")
        labels = labels.reshape(-1).long()
        _check_label_range(labels, vocab, opts.ignore_index)
    if labels is None and opts.hard_labels == "labels" and opts.alpha < 1.0:
        raise ValueError(
            f"alpha={opts.alpha} < 1 mixes in a hard-label loss, but labels is None; pass labels,"
            " set hard_labels='teacher_argmax', or use alpha=1"
        )
    if labels is None and opts.teacher_ce_weight > 0:
        raise ValueError("teacher_ce_weight > 0 trains the teacher on labels, but labels is None; pass labels")
    return labels


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if labels.is_cuda:
        # A device-side assert: no host sync on the training path.
        torch._assert_async(~bad.any(), "labels outside [0, vocab_size) that are not ignore_index")
    elif bad.any():
        value = labels[bad][0].item()
        raise ValueError(
            f"label {value} is outside [0, {vocab}) and is not ignore_index={ignore_index}; check the"
            " tokenizer's vocabulary against the model's, or mark the position with ignore_index"
        )


class RowStatistics(NamedTuple):
    """What a backend computes per row in its streaming pass (float tensors are fp32, or fp64 for fp64 input).

    Attributes:
        divergence: ``[N]`` divergence D(p, q) at temperature T, without the T² factor.
        student_lse: ``[N]`` logsumexp of the student's valid logits at T=1.
        teacher_lse: ``[N]`` logsumexp of the teacher's valid logits at T=1.
        student_argmax: ``[N]`` int64 argmax over the student's valid columns.
        teacher_argmax: ``[N]`` int64 argmax over the teacher's valid columns.
    """

    divergence: torch.Tensor
    student_lse: torch.Tensor
    teacher_lse: torch.Tensor
    student_argmax: torch.Tensor
    teacher_argmax: torch.Tensor


class RowTargets(NamedTuple):
    """Per-row targets and masks derived from the labels (all ``[N]``)."""

    counted: torch.Tensor  # bool: the row contributes to the loss
    hard: torch.Tensor | None  # int64 student CE target (clamped to a valid index on ignored rows)
    teacher: torch.Tensor | None  # int64 teacher CE target (the labels), likewise clamped


def row_targets(
    labels: torch.Tensor | None,
    teacher_argmax: torch.Tensor | None,
    opts: LossOptions,
    num_rows: int,
    device: torch.device,
) -> RowTargets:
    """Counted-row mask and the hard / teacher CE targets; ``teacher_argmax`` is needed only in that mode."""
    if labels is None:
        counted = torch.ones(num_rows, dtype=torch.bool, device=device)
        safe_labels = None
    else:
        counted = labels != opts.ignore_index
        safe_labels = torch.where(counted, labels, 0)
    hard = teacher_argmax if opts.hard_labels == "teacher_argmax" else safe_labels
    return RowTargets(counted=counted, hard=hard, teacher=safe_labels)


def gather_target_logits(
    student: torch.Tensor, teacher: torch.Tensor, targets: RowTargets, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``[N]`` student logit at the hard target and teacher logit at the label (None where there is none)."""
    s_y = None if targets.hard is None else _gather(student, targets.hard, dtype)
    t_y = None if targets.teacher is None else _gather(teacher, targets.teacher, dtype)
    return s_y, t_y


def finish_rows(
    rows: RowStatistics,
    targets: RowTargets,
    student_target_logit: torch.Tensor | None,
    teacher_target_logit: torch.Tensor | None,
    opts: LossOptions,
) -> tuple[DistillationOutput, torch.Tensor]:
    """Combine per-row statistics into the reduced :class:`DistillationOutput`.

    ``student_target_logit`` / ``teacher_target_logit`` come from :func:`gather_target_logits`.

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
    hard = nan if student_target_logit is None else rows.student_lse - student_target_logit
    teacher_ce = nan if teacher_target_logit is None else rows.teacher_lse - teacher_target_logit

    loss = opts.alpha * soft
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


def triton_available() -> bool:
    """Whether the Triton package can be imported here (it is only installed on Linux)."""
    return importlib.util.find_spec("triton") is not None


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """Resolve ``backend`` for tensors on ``tensor``'s device; a clear error where Triton cannot run."""
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda and triton_available()
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}; choose one of 'auto', 'triton', 'torch'")
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
    if tensor.is_cuda:
        return True
    from . import divergence

    if not divergence.is_interpreted():
        requested = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
        hint = (
            " (TRITON_INTERPRET=1 is set, but only after lit_distill.kernels.divergence was imported;"
            " set it before the first Triton call)"
            if requested
            else ""
        )
        raise ValueError(
            f"backend='triton' on {tensor.device} tensors needs CUDA tensors, or Triton's CPU interpreter"
            f" (TRITON_INTERPRET=1 in the environment before the kernels are first used){hint};"
            " use backend='torch' or 'auto' on CPU"
        )
    return True
