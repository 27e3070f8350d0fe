"""Fused-linear distillation loss: the lm_head projections and the divergence, a chunk of tokens at a time.

The ``[tokens x vocab]`` logits of the two models never exist in full. For each chunk of tokens:

1. The logits are projected in fp32 (in the inputs' dtype for fp32/fp64). Products of half-precision
   numbers are exact in fp32, so bf16/fp16 inputs lose nothing beyond their own rounding: on CUDA through
   fp32-output GEMMs at the half-precision matmul's speed, on CPU through fp32 copies of a slice of the
   weight at a time (:mod:`.linear_plan`, also for the fallback where torch has neither). The bias is
   added in the logits' dtype.
2. The row statistics and each row's loss gradient with respect to the chunk's logits are computed (the
   Triton kernels on CUDA, the chunked PyTorch path elsewhere), already times the row's scale, and in the
   matmul dtype: the Triton gradient pass reads the fp32 logits and writes the bf16 gradient itself.
3. That gradient is folded into the hidden-state gradient (per chunk) and the weight and bias gradients,
   summed across chunks (:class:`GradientAccumulators`).

The backward then only multiplies by ``grad_output``. With ``reduction="none"`` the per-token
``grad_output`` is unknown in the forward, so the backward recomputes the chunks instead. The chunk size
comes from a memory budget: :func:`.linear_plan.planned_extra_bytes` adds up what this module allocates.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import torch_backend
from .backend import use_triton
from .inputs import check_labels, check_linear_inputs, resolve_vocab_size
from .linear_plan import GradientAccumulators, Head, choose_chunk_size, head, project
from .options import LossOptions, loss_keywords
from .rows import (
    DistillationOutput,
    RowStatistics,
    RowTargets,
    TargetLogits,
    finish_rows,
    forward_row_scale,
    row_grad_scale,
    row_targets,
)


@loss_keywords
def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    **options: Any,
) -> DistillationOutput:
    """Distillation loss of ``hidden @ weight.T + bias`` logits, without materializing them.

    Equal to ``distillation_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden @
    teacher_weight.T + teacher_bias, labels, ...)`` with the same keywords, but the logits only ever exist
    one chunk of tokens at a time, in fp32 for half-precision inputs.

    Args:
        student_hidden: ``(..., H_s)`` last hidden states of the student.
        student_weight: ``(V_s, H_s)`` student lm_head weight (may be tied to the input embedding).
        teacher_hidden: ``(..., H_t)`` teacher hidden states, same leading shape; H_t may differ from H_s.
        teacher_weight: ``(V_t, H_t)`` teacher lm_head weight.
        labels: ``(...)`` targets aligned with the hidden states, or None.
        student_bias: ``(V_s,)`` or None.
        teacher_bias: ``(V_t,)`` or None.
        chunk_size: tokens per chunk; None picks it from a memory budget (see
            :func:`.linear_plan.choose_chunk_size`).
        **options: the keyword-only loss options, as in :func:`lit_distill.kernels.distillation_loss`.

    Returns:
        :class:`DistillationOutput`. Gradients reach the student's hidden states, weight and bias; with
        ``teacher_ce_weight > 0`` also the teacher's, where they require grad (co-distillation).

    Under autocast the matmuls take their inputs in the autocast dtype, as ``nn.Linear``'s would; the
    weight gradient of fp32 parameters is still summed in fp32 across chunks.
    """
    opts = LossOptions(**options)
    device_type = student_hidden.device.type if isinstance(student_hidden, torch.Tensor) else "cpu"
    autocast = torch.is_autocast_enabled(device_type)
    tensors = check_linear_inputs(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, autocast
    )
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    lead = student_hidden.shape[:-1]
    vocab = resolve_vocab_size(student_weight.shape[0], teacher_weight.shape[0], opts)
    flat_labels = check_labels(
        labels, lead, vocab, student_hidden.device, opts, what="the hidden states' leading shape"
    )
    cast = torch.get_autocast_dtype(device_type) if autocast else None  # applied chunk by chunk
    h_s, w_s, b_s, h_t, w_t, b_t = tensors
    h_s = h_s.reshape(-1, h_s.shape[-1])
    h_t = h_t.reshape(-1, h_t.shape[-1])
    triton = use_triton(opts.backend, h_s)
    grad = torch.is_grad_enabled()
    student_grad = grad and any(x is not None and x.requires_grad for x in (h_s, w_s, b_s))
    teacher_grad = (
        grad and opts.teacher_ce_weight > 0 and any(x is not None and x.requires_grad for x in (h_t, w_t, b_t))
    )
    heads = (head(w_s, b_s, cast, student_grad), head(w_t, b_t, cast, teacher_grad))
    if chunk_size is None:
        chunk_size = choose_chunk_size(h_s.shape[0], *heads, device_type=h_s.device.type, triton=triton)
    out = FusedLinearDistillationFunction.apply(
        h_s, w_s, b_s, h_t, w_t, b_t, flat_labels, opts, vocab, chunk_size, triton, heads
    )
    out = DistillationOutput(*out)
    if opts.reduction == "none":
        out = out._replace(loss=out.loss.reshape(lead))
    return out


class FusedLinearDistillationFunction(torch.autograd.Function):
    """Chunked ``hidden @ weight.T`` projections and distillation loss, gradients computed in the forward.

    With ``S = H_s W_sᵀ + b_s`` and ``T = H_t W_tᵀ + b_t`` and G = d loss / dS per chunk (see
    ``TritonDistillationFunction`` for G): ``dH_s = G W_s``, ``dW_s = Σ_chunks Gᵀ H_s``, ``db_s = Σ G``;
    likewise for the teacher with its teacher-CE gradient.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, opts, vocab, chunk_size, triton, heads):
        n = h_s.shape[0]
        device = h_s.device
        pre = row_targets(labels, None, opts, n, device)
        divisor = pre.counted.sum().clamp(min=1).to(torch.float32)
        in_forward = opts.reduction != "none"
        scale = forward_row_scale(pre.counted, divisor, opts.reduction) if in_forward else None
        tensors = (h_s, w_s, b_s, h_t, w_t, b_t)
        accumulators = _accumulators(tensors, heads) if in_forward else (None, None)
        with torch.autocast(device.type, enabled=False):
            rows, targets, logits = _run_chunks(
                tensors, labels, pre, opts, vocab, chunk_size, triton, heads, scale, accumulators
            )
        output, divisor = finish_rows(rows, targets, logits.student, logits.teacher, opts, logits.student_label)
        ctx.opts, ctx.vocab, ctx.chunk_size, ctx.triton, ctx.heads = opts, vocab, chunk_size, triton, heads
        ctx.accumulators = accumulators
        ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, labels, pre.counted, divisor)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics outputs
        return tuple(output)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if grad_loss is None:
            return (None,) * 12
        h_s, w_s, b_s, h_t, w_t, b_t, labels, counted, divisor = ctx.saved_tensors
        opts = ctx.opts
        if opts.reduction == "none":  # per-token grad_output: recompute the chunks with it
            scale = row_grad_scale(grad_loss, counted, divisor, "none")
            tensors = (h_s, w_s, b_s, h_t, w_t, b_t)
            acc_s, acc_t = _accumulators(tensors, ctx.heads)
            pre = row_targets(labels, None, opts, h_s.shape[0], h_s.device)
            with torch.autocast(h_s.device.type, enabled=False):
                _run_chunks(
                    tensors, labels, pre, opts, ctx.vocab, ctx.chunk_size, ctx.triton, ctx.heads, scale, (acc_s, acc_t)
                )
            factor = None
        else:
            if ctx.accumulators is None:
                raise RuntimeError(
                    "backward through a fused-linear distillation loss ran twice; its gradients are computed in"
                    " the forward and handed over once. Recompute the loss for a second backward."
                )
            (acc_s, acc_t), ctx.accumulators = ctx.accumulators, None
            factor = grad_loss
        student = acc_s.scaled(factor, b_s) if acc_s is not None else (None, None, None)
        teacher = acc_t.scaled(factor, b_t) if acc_t is not None else (None, None, None)
        return (*student, *teacher, None, None, None, None, None, None)


def _accumulators(tensors, heads: tuple[Head, Head]) -> tuple[GradientAccumulators | None, GradientAccumulators | None]:
    h_s, w_s, b_s, h_t, w_t, b_t = tensors
    student, teacher = heads
    return (
        GradientAccumulators(h_s, w_s, b_s) if student.grad else None,
        GradientAccumulators(h_t, w_t, b_t) if teacher.grad else None,
    )


class _Side(NamedTuple):
    """One model's operands in the chunk loop."""

    hidden: torch.Tensor  # [N, H], its own dtype
    weight: torch.Tensor  # [V, H] in the matmul dtype (a copy only under autocast)
    bias: torch.Tensor | None  # [V] in the logits' dtype
    head: Head
    grads: GradientAccumulators | None


def _run_chunks(tensors, labels, pre: RowTargets, opts, vocab, chunk_size, triton, heads, scale, accumulators):
    """Loop over token chunks; returns the RowStatistics, RowTargets and TargetLogits of all rows.

    Each model's chunk logits are projected once per chunk, and every term of the loss (soft, hard with its
    label_weight mix, teacher CE) and its gradient come from that one projection.

    With ``scale`` (``[N]`` row-loss gradient factors) the gradients are folded into the accumulators.
    """
    n = tensors[0].shape[0]
    sides = [
        _Side(h, w.to(head.matmul_dtype), None if b is None else b.to(head.logits_dtype), head, acc)
        for h, w, b, head, acc in zip(tensors[0::3], tensors[1::3], tensors[2::3], heads, accumulators, strict=True)
    ]
    step = _chunk_step(triton)
    parts = []
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        hidden = [side.hidden[rows].to(side.head.matmul_dtype) for side in sides]
        logits = [project(x, s.weight, s.bias, s.head.logits_dtype) for x, s in zip(hidden, sides, strict=True)]
        chunk_pre = RowTargets(*(None if x is None else x[rows] for x in pre))
        chunk_scale = None if scale is None else scale[rows]
        # Each gradient's dtype, None for none: the Triton kernels write it, the PyTorch path the logits' dtype.
        wanted = [side.head.matmul_dtype if chunk_scale is not None and side.grads else None for side in sides]
        chunk_labels = None if labels is None else labels[rows]
        part, grads = step(*logits, chunk_labels, chunk_pre, chunk_scale, opts, vocab, *wanted)
        parts.append(part)
        del logits  # freed before any cast (a gradient written over them lives on in ``grads``)
        _fold(grads, hidden, sides, rows)
        del grads, hidden  # free the chunk before the next one allocates
    return _concatenate(parts, n, tensors[0].device)


def _fold(grads, hidden, sides, rows: slice) -> None:
    """Add each side's chunk gradient, cast to the matmul dtype if it is not in it, to its accumulators."""
    for grad, x, side in zip(grads, hidden, sides, strict=True):
        if grad is not None:
            side.grads.add(grad.to(side.head.matmul_dtype), x, side.weight, rows)


def _chunk_step(triton: bool):
    """The backend's ``fused_linear_chunk``: statistics and scaled row-loss gradients of a chunk of logits."""
    if triton:
        from . import triton_backend  # imported on the first Triton call only

        return triton_backend.fused_linear_chunk
    return torch_backend.fused_linear_chunk


def _concatenate(parts, n: int, device: torch.device):
    if not parts:  # no tokens at all
        empty = torch.empty(0, dtype=torch.float32, device=device)
        index = torch.empty(0, dtype=torch.long, device=device)
        rows = RowStatistics(empty, empty, empty, empty, empty, index, index)
        return rows, RowTargets(torch.empty(0, dtype=torch.bool, device=device), None, None), TargetLogits(None, None)

    def cat(chunks: tuple) -> torch.Tensor | None:
        return None if chunks[0] is None else torch.cat(chunks)

    rows, targets, logits = zip(*parts, strict=True)  # per field, its value in every chunk
    rows = RowStatistics(*(cat(field) for field in zip(*rows, strict=True)))
    targets = RowTargets(*(cat(field) for field in zip(*targets, strict=True)))
    return rows, targets, TargetLogits(*(cat(field) for field in zip(*logits, strict=True)))
