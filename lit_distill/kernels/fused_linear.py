"""Fused-linear distillation loss: the lm_head projections and the divergence, a chunk of tokens at a time.

The ``[tokens x vocab]`` logits of the two models never exist in full. For each chunk of tokens the
logits are projected with torch matmuls (cuBLAS on GPUs), the row statistics and the gradient of each
row's loss with respect to the chunk's logits are computed (the Triton kernels on CUDA, which write the
gradient over the logits in place; the chunked PyTorch path elsewhere), and that gradient is folded at
once into the hidden-state gradient (per chunk) and the weight and bias gradients (accumulated in fp32
across chunks). The backward then only multiplies by ``grad_output``. With ``reduction="none"`` the
per-token ``grad_output`` is unknown in the forward, so the backward recomputes the chunks instead.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

from . import torch_backend
from .backend import use_triton
from .inputs import check_labels, check_linear_inputs, resolve_vocab_size
from .options import LossOptions, loss_keywords
from .rows import (
    DistillationOutput,
    RowStatistics,
    RowTargets,
    finish_rows,
    forward_row_scale,
    row_grad_scale,
    row_targets,
)

#: Bytes the per-chunk buffers may take: the logits of both models (and, on the PyTorch path, the
#: gradient buffers beside them). At V=128256 in bf16 the CUDA budget gives 2048-token chunks, large
#: enough that every chunk's matmuls run near peak; the CPU budget keeps the chunk small against RAM.
MEMORY_BUDGET_BYTES = {"cuda": 1 << 30, "cpu": 256 << 20}


def choose_chunk_size(
    num_tokens: int, student_vocab: int, teacher_vocab: int, dtype: torch.dtype, device: torch.device, triton: bool
) -> int:
    """Tokens per chunk under ``MEMORY_BUDGET_BYTES`` for the device.

    Per token the chunk holds one row of student and one of teacher logits in ``dtype``; the Triton path
    writes gradients over them, the PyTorch path needs as much again for gradient buffers. The result is
    rounded down to a multiple of 64 (GEMM-friendly) when at least 64, and never exceeds the token count.
    """
    element = torch.empty((), dtype=dtype).element_size()
    per_token = (student_vocab + teacher_vocab) * element * (1 if triton else 2)
    budget = MEMORY_BUDGET_BYTES.get(device.type, MEMORY_BUDGET_BYTES["cpu"])
    chunk = max(1, budget // per_token)
    if chunk >= 64:
        chunk -= chunk % 64
    return max(1, min(chunk, num_tokens))


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
    one chunk of tokens at a time.

    Args:
        student_hidden: ``(..., H_s)`` last hidden states of the student.
        student_weight: ``(V_s, H_s)`` student lm_head weight (may be tied to the input embedding).
        teacher_hidden: ``(..., H_t)`` teacher hidden states, same leading shape; H_t may differ from H_s.
        teacher_weight: ``(V_t, H_t)`` teacher lm_head weight.
        labels: ``(...)`` targets aligned with the hidden states, or None.
        student_bias: ``(V_s,)`` or None.
        teacher_bias: ``(V_t,)`` or None.
        chunk_size: tokens per chunk; None picks it from a memory budget (see :func:`choose_chunk_size`).
        **options: the keyword-only loss options, as in :func:`lit_distill.kernels.distillation_loss`.

    Returns:
        :class:`DistillationOutput`. Gradients reach the student's hidden states, weight and bias; with
        ``teacher_ce_weight > 0`` also the teacher's, where they require grad (co-distillation).

    Under autocast the projections run in the autocast dtype, as ``nn.Linear`` would; the weight and bias
    gradients still accumulate in fp32 across chunks.
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
    if autocast:  # what nn.Linear under autocast would do; the casts are differentiable
        dtype = torch.get_autocast_dtype(device_type)
        tensors = [None if x is None else x.to(dtype) for x in tensors]
    h_s, w_s, b_s, h_t, w_t, b_t = tensors
    h_s = h_s.reshape(-1, h_s.shape[-1])
    h_t = h_t.reshape(-1, h_t.shape[-1])
    triton = use_triton(opts.backend, h_s)
    if chunk_size is None:
        chunk_size = choose_chunk_size(h_s.shape[0], w_s.shape[0], w_t.shape[0], h_s.dtype, h_s.device, triton)
    grad = torch.is_grad_enabled()
    student_grad = grad and any(x is not None and x.requires_grad for x in (h_s, w_s, b_s))
    teacher_grad = (
        grad and opts.teacher_ce_weight > 0 and any(x is not None and x.requires_grad for x in (h_t, w_t, b_t))
    )
    out = FusedLinearDistillationFunction.apply(
        h_s, w_s, b_s, h_t, w_t, b_t, flat_labels, opts, vocab, chunk_size, triton, student_grad, teacher_grad
    )
    out = DistillationOutput(*out)
    if opts.reduction == "none":
        out = out._replace(loss=out.loss.reshape(lead))
    return out


class _Accumulators:
    """Gradients of one side (student or teacher): dH per chunk, dW and db summed over chunks in fp32."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.hidden = torch.empty_like(hidden)
        self.weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        self.bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)

    def add(self, grad_logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, rows: slice) -> None:
        torch.mm(grad_logits, weight, out=self.hidden[rows])
        _addmm_fp32(self.weight, grad_logits.t(), hidden)
        if self.bias is not None:
            self.bias.add_(grad_logits.sum(0, dtype=torch.float32))

    def scaled(self, factor: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
        grads = [self.hidden, self.weight, self.bias]
        if factor is not None:
            grads = [None if g is None else g.mul_(factor.to(g.dtype)) for g in grads]
        hidden, w, b = grads
        return hidden, w.to(weight.dtype), None if b is None else b.to(bias.dtype)


def _addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with ``acc`` fp32 and ``a``/``b`` possibly half precision."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        with contextlib.suppress(RuntimeError, TypeError):  # fp32-output GEMM on half inputs, where supported
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


class FusedLinearDistillationFunction(torch.autograd.Function):
    """Chunked ``hidden @ weight.T`` projections and distillation loss, gradients computed in the forward.

    With ``S = H_s W_sᵀ + b_s`` and ``T = H_t W_tᵀ + b_t`` and G = d loss / dS per chunk (see
    ``TritonDistillationFunction`` for G): ``dH_s = G W_s``, ``dW_s = Σ_chunks Gᵀ H_s``, ``db_s = Σ G``;
    likewise for the teacher with its teacher-CE gradient.
    """

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, opts, vocab, chunk_size, triton, student_grad, teacher_grad):
        n = h_s.shape[0]
        device = h_s.device
        pre = row_targets(labels, None, opts, n, device)
        divisor = pre.counted.sum().clamp(min=1).to(torch.float32)
        in_forward = opts.reduction != "none"
        scale = forward_row_scale(pre.counted, divisor, opts.reduction) if in_forward else None
        acc_s = _Accumulators(h_s, w_s, b_s) if in_forward and student_grad else None
        acc_t = _Accumulators(h_t, w_t, b_t) if in_forward and teacher_grad else None
        with torch.autocast(device.type, enabled=False):
            rows, targets, s_y, t_y = _run_chunks(
                (h_s, w_s, b_s, h_t, w_t, b_t), labels, pre, opts, vocab, chunk_size, triton, scale, acc_s, acc_t
            )
        output, divisor = finish_rows(rows, targets, s_y, t_y, opts)
        ctx.opts, ctx.vocab, ctx.chunk_size, ctx.triton = opts, vocab, chunk_size, triton
        ctx.accumulators = (acc_s, acc_t)
        ctx.save_for_backward(h_s, w_s, b_s, h_t, w_t, b_t, labels, pre.counted, divisor)
        ctx.wants = (student_grad, teacher_grad)
        ctx.mark_non_differentiable(*output[1:])
        return tuple(output)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        h_s, w_s, b_s, h_t, w_t, b_t, labels, counted, divisor = ctx.saved_tensors
        opts = ctx.opts
        student_grad, teacher_grad = ctx.wants
        if opts.reduction == "none":  # per-token grad_output: recompute the chunks with it
            scale = row_grad_scale(grad_loss, counted, divisor, "none")
            acc_s = _Accumulators(h_s, w_s, b_s) if student_grad else None
            acc_t = _Accumulators(h_t, w_t, b_t) if teacher_grad else None
            pre = row_targets(labels, None, opts, h_s.shape[0], h_s.device)
            with torch.autocast(h_s.device.type, enabled=False):
                _run_chunks(
                    (h_s, w_s, b_s, h_t, w_t, b_t),
                    labels,
                    pre,
                    opts,
                    ctx.vocab,
                    ctx.chunk_size,
                    ctx.triton,
                    scale,
                    acc_s,
                    acc_t,
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
        student = acc_s.scaled(factor, w_s, b_s) if acc_s is not None else (None, None, None)
        teacher = acc_t.scaled(factor, w_t, b_t) if acc_t is not None else (None, None, None)
        return (*student, *teacher, None, None, None, None, None, None, None)


def _run_chunks(tensors, labels, pre: RowTargets, opts, vocab, chunk_size, triton, scale, acc_s, acc_t):
    """Loop over token chunks; returns (RowStatistics, RowTargets, student / teacher target logits) of all rows.

    With ``scale`` (``[N]`` row-loss gradient factors) the gradients are folded into the accumulators.
    """
    h_s, w_s, b_s, h_t, w_t, b_t = tensors
    n = h_s.shape[0]
    step = _chunk_step(triton)
    parts = []
    for start in range(0, n, chunk_size):
        rows = slice(start, min(start + chunk_size, n))
        logits_s = F.linear(h_s[rows], w_s, b_s)
        logits_t = F.linear(h_t[rows], w_t, b_t)
        chunk_labels = None if labels is None else labels[rows]
        chunk_pre = RowTargets(*(None if x is None else x[rows] for x in pre))
        chunk_scale = None if scale is None else scale[rows]
        part, (grad_s, grad_t) = step(
            logits_s,
            logits_t,
            chunk_labels,
            chunk_pre,
            chunk_scale,
            opts,
            vocab,
            chunk_scale is not None and acc_s is not None,
            chunk_scale is not None and acc_t is not None,
        )
        parts.append(part)
        if grad_s is not None:
            acc_s.add(grad_s, h_s[rows], w_s, rows)
        if grad_t is not None:
            acc_t.add(grad_t, h_t[rows], w_t, rows)
        del logits_s, logits_t, grad_s, grad_t  # free the chunk before the next one allocates
    return _concatenate(parts, n, h_s.device)


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
        return rows, RowTargets(torch.empty(0, dtype=torch.bool, device=device), None, None), None, None

    def cat(chunks: tuple) -> torch.Tensor | None:
        return None if chunks[0] is None else torch.cat(chunks)

    rows, targets, s_y, t_y = zip(*parts, strict=True)  # per field, its value in every chunk
    rows = RowStatistics(*(cat(field) for field in zip(*rows, strict=True)))
    targets = RowTargets(*(cat(field) for field in zip(*targets, strict=True)))
    return rows, targets, cat(s_y), cat(t_y)
