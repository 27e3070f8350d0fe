"""Checking the tensor arguments against each other and flattening them to rows, for every entry point.

Both backends and the fused-linear path work on ``[N, V]`` rows; the checks here run before any of them,
so a bad argument gets the same message whichever backend would have run.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .options import LossOptions


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
    if labels is None and opts.hard_labels == "teacher_argmax" and opts.label_weight > 0 and opts.alpha < 1.0:
        raise ValueError(
            f"label_weight={opts.label_weight} mixes a cross-entropy on labels into the hard term, but labels is"
            " None; pass labels or set label_weight=0"
        )
    if labels is None and opts.teacher_ce_weight > 0:
        raise ValueError("teacher_ce_weight > 0 trains the teacher on labels, but labels is None; pass labels")
    return labels


def check_linear_inputs(h_s, w_s, b_s, h_t, w_t, b_t, autocast: bool) -> list[torch.Tensor | None]:
    """Check the hidden states, lm_head weights and biases of ``fused_linear_distillation_loss`` together."""
    named = {
        "student_hidden": h_s,
        "student_weight": w_s,
        "student_bias": b_s,
        "teacher_hidden": h_t,
        "teacher_weight": w_t,
        "teacher_bias": b_t,
    }
    for name, x in named.items():
        if x is None and name.endswith("bias"):
            continue
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {x.dtype}")
    for side, h, w, b in (("student", h_s, w_s, b_s), ("teacher", h_t, w_t, b_t)):
        if h.dim() < 1 or w.dim() != 2 or h.shape[-1] != w.shape[1]:
            raise ValueError(
                f"{side}_hidden {tuple(h.shape)} and {side}_weight {tuple(w.shape)} do not match: the weight"
                f" must be (vocab, hidden) with hidden = the last dimension of {side}_hidden"
            )
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"{side}_bias {tuple(b.shape)} must have shape ({w.shape[0]},) to match {side}_weight")
        for name, x in ((f"{side}_weight", w), (f"{side}_bias", b)):
            if x is None:
                continue
            if x.device != h.device:
                raise ValueError(f"{name} is on {x.device} but {side}_hidden on {h.device}; move them together")
            if x.dtype != h.dtype and not autocast:
                raise ValueError(
                    f"{name} is {x.dtype} but {side}_hidden is {h.dtype}; cast one of them (or run under autocast)"
                )
    if h_t.device != h_s.device:
        raise ValueError(f"teacher_hidden is on {h_t.device} but student_hidden on {h_s.device}")
    if h_s.shape[:-1] != h_t.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(h_s.shape)} and teacher_hidden {tuple(h_t.shape)} must have the same"
            " leading shape (the same tokens)"
        )
    return [h_s, w_s, b_s, h_t, w_t, b_t]


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
