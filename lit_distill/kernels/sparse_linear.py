"""The autograd function behind :func:`~lit_distill.kernels.sparse.fused_linear_sparse_distillation_loss`:
token chunks of ``hidden @ weight.T + bias`` scored against a sparse teacher, the chunk's logits freed before
the next one is projected."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear_plan import GradientAccumulators
from .rows import forward_row_scale, row_grad_scale, row_targets
from .sparse_rows import SparseRows, empty_rows, finish
from .sparse_torch import torch_sparse_rows


class FusedLinearSparse(torch.autograd.Function):
    """Token-chunked ``S = H Wᵀ + b`` and the sparse loss; with G = d loss / dS per chunk, ``dH = G W``,
    ``dW = Σ_chunks Gᵀ H``, ``db = Σ G``, folded as the dense fused-linear loss folds them
    (:class:`~.linear_plan.GradientAccumulators`). ``cast``: the autocast dtype the matmuls take, or None."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, logprobs, labels, opts, tail, vocab, chunk_size, triton, cast, want):
        ctx.args = (opts, tail, vocab, chunk_size, triton, cast)
        counted = row_targets(labels, None, opts, hidden.shape[0], hidden.device).counted
        divisor = counted.sum().clamp(min=1).to(torch.float32)
        in_forward = want and opts.reduction != "none"  # grad mode is off in here: asked outside
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
        return *grads.scaled(factor, bias), *[None] * 10


def run_chunks(hidden, weight, bias, ids, logprobs, labels, opts, tail, vocab, chunk_size, triton, cast, scale):
    """(SparseRows of all tokens, GradientAccumulators or None): with ``scale`` the chunks' gradients are
    folded in."""
    n = hidden.shape[0]
    if triton:
        from .sparse_triton import triton_sparse_rows as rows_of
    else:
        rows_of = torch_sparse_rows
    grads = None if scale is None else GradientAccumulators(hidden, weight, bias)
    matmul = cast or weight.dtype
    weight_m, bias_m = weight.to(matmul), None if bias is None else bias.to(matmul)  # copies under autocast only
    parts = []
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen here, chunk by chunk
        for start in range(0, n, chunk_size):
            r = slice(start, min(start + chunk_size, n))
            x = hidden[r].to(matmul)
            logits = F.linear(x, weight_m, bias_m)
            y, scale_r = (None if t is None else t[r] for t in (labels, scale))
            grad = None if scale is None else logits  # written over the logits, which are read first
            parts.append(rows_of(logits, ids[r], logprobs[r], y, opts, tail, vocab, scale=scale_r, grad=grad))
            if grad is not None:
                grads.add(grad, x, weight_m, r)
            del logits, grad
    if not parts:
        return empty_rows(torch.float32, hidden.device, labels is not None), grads
    return SparseRows(*(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True))), grads
