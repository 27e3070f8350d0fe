"""The autograd function behind :func:`~lit_distill.kernels.sparse.fused_linear_sparse_distillation_loss`:
token chunks of ``hidden @ weight.T + bias`` scored against a sparse teacher, the chunk's logits freed before
the next one is projected.

The chunk loop of the dense fused-linear loss (``fused_linear.py``), with one head: the logits are projected
by :func:`.linear_plan.project`, in fp32 for half-precision inputs (at the half-precision matmul's speed on
CUDA; :func:`.linear_plan.logits_dtype` says where it cannot), the backend writes each row's loss gradient
computed in fp32 and rounded once to the matmul dtype (over the logits where that is their dtype, else into a
new buffer as it reads them), and :class:`.linear_plan.GradientAccumulators` folds it in. The chunk size comes
from the same memory plan (:func:`plan_keywords`).
"""

from __future__ import annotations

import functools

import torch

from .linear_plan import GradientAccumulators, Head, project
from .rows import forward_row_scale, row_grad_scale, row_targets
from .sparse_rows import SparseRows, empty_rows, finish
from .sparse_torch import torch_sparse_rows, workspace_bytes


class FusedLinearSparse(torch.autograd.Function):
    """Token-chunked ``S = H Wᵀ + b`` and the sparse loss; with G = d loss / dS per chunk, ``dH = G W``,
    ``dW = Σ_chunks Gᵀ H``, ``db = Σ G``, folded as the dense fused-linear loss folds them
    (:class:`~.linear_plan.GradientAccumulators`). ``side``: the head's :class:`~.linear_plan.Head` (its dtypes
    under autocast, and whether gradients are wanted)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, logprobs, labels, opts, tail, vocab, chunk_size, triton, side):
        ctx.args = (opts, tail, vocab, chunk_size, triton, side)
        counted = row_targets(labels, None, opts, hidden.shape[0], hidden.device).counted
        divisor = counted.sum().clamp(min=1).to(torch.float32)
        in_forward = side.grad and opts.reduction != "none"  # grad mode is off in here: asked outside
        scale = forward_row_scale(counted, divisor, opts.reduction) if in_forward else None
        rows, ctx.grads = run_chunks(hidden, weight, bias, ids, logprobs, labels, *ctx.args, scale)
        output, divisor = finish(rows, labels, opts)
        ctx.save_for_backward(hidden, weight, bias, ids, logprobs, labels, counted, divisor)
        ctx.mark_non_differentiable(*output[1:])
        return tuple(output)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        hidden, weight, bias, ids, logprobs, labels, counted, divisor = ctx.saved_tensors
        if ctx.args[0].reduction == "none":  # per-token grad_output: recompute the chunks with it
            scale = row_grad_scale(grad_loss, counted, divisor, "none")
            grads, factor = run_chunks(hidden, weight, bias, ids, logprobs, labels, *ctx.args, scale)[1], None
        elif ctx.grads is None:
            raise RuntimeError("backward through a fused-linear sparse loss ran twice; recompute the loss")
        else:
            grads, factor = ctx.grads, grad_loss
        ctx.grads = None
        return *grads.scaled(factor, bias), *[None] * 9


def run_chunks(hidden, weight, bias, ids, logprobs, labels, opts, tail, vocab, chunk_size, triton, side: Head, scale):
    """(SparseRows of all tokens, GradientAccumulators or None): with ``scale`` the chunks' gradients are
    folded in."""
    n = hidden.shape[0]
    if triton:
        from .sparse_triton import triton_sparse_rows as rows_of
    else:
        rows_of = torch_sparse_rows
    grads = None if scale is None else GradientAccumulators(hidden, weight, bias)
    weight_m = weight.to(side.matmul_dtype)  # a copy under autocast only
    bias_l = None if bias is None else bias.to(side.logits_dtype)
    apart = side.logits_dtype != side.matmul_dtype  # fp32 logits: the gradient in a buffer of its own
    parts = []
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen here, chunk by chunk
        for start in range(0, n, chunk_size):
            r = slice(start, min(start + chunk_size, n))
            x = hidden[r].to(side.matmul_dtype)
            logits = project(x, weight_m, bias_l, side.logits_dtype)
            y, scale_r = (None if t is None else t[r] for t in (labels, scale))
            grad = None if scale is None else torch.empty_like(logits, dtype=side.matmul_dtype) if apart else logits
            parts.append(rows_of(logits, ids[r], logprobs[r], y, opts, tail, vocab, scale=scale_r, grad=grad))
            del logits  # freed before the fold (a gradient written over them lives on in ``grad``)
            if grad is not None:
                grads.add(grad, x, weight_m, r)
            del grad, x
    if not parts:
        return empty_rows(torch.float32, hidden.device, labels is not None), grads
    return SparseRows(*(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True))), grads


def plan_keywords(side: Head, cross_entropy_t1: bool, *, device_type: str, triton: bool) -> dict:
    """The keywords of :func:`.linear_plan.planned_extra_bytes` and :func:`.linear_plan.choose_chunk_size` that
    plan this form's chunks (``teacher=None``): ``cross_entropy_t1``, a cross-entropy at T != 1 (one more
    PyTorch workspace buffer). Not counted: the slot math's ``[R, K]`` temporaries, a few KB a token at K = 64
    where the chunk's fp32 logits and bf16 gradient take 6 V bytes."""
    buffers = 1 + cross_entropy_t1
    workspace = functools.partial(workspace_bytes, vocab=side.vocab, dtype=side.logits_dtype, buffers=buffers)
    return {"teacher": None, "device_type": device_type, "triton": triton, "workspace": workspace}
