"""The sparse-teacher loss in chunked PyTorch: the CPU path, and the fallback wherever Triton cannot run.

Rows are processed a chunk at a time in a reused ``[chunk, V]`` workspace. Per chunk: the row max (a read
pass), ``s - max`` with the slot columns set to -inf, its exponentials and their sums (the tail's sum, taken
directly); the bucket math of ``sparse_rows.py`` on the K slot logits; and, when a gradient is wanted, the
gradient written at once (the tail's exponentials times a per-row factor, then the slot columns), which the
backward only rescales: on a CPU, recomputing the exponentials would cost more than keeping the gradient.
"""

from __future__ import annotations

import math

import torch

from .options import LossOptions
from .rows import DistillationOutput, forward_row_scale, row_targets
from .sparse_rows import (
    SlotRows,
    SparseRows,
    bucket_rows,
    empty_rows,
    finish,
    shift_of,
    slot_values,
    tail_coefficients,
    total_log_sum,
)

CHUNK_ELEMENTS = 1 << 23  # per [chunk, V] buffer (32 MiB in fp32): little per-chunk Python work, still in L3
UNDERFLOW = -69.0  # log of 1e-30: a tail sum below it has lost fp32 digits to subnormals


def zero_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of ``grad`` where ``rows`` is True to exactly 0 (0 * NaN is NaN); on CPU touching only those rows."""
    if rows.device.type != "cpu":
        return grad.masked_fill_(rows[:, None], 0.0)
    if rows.any():
        grad[rows] = 0.0
    return grad


def fill_index(ids: torch.Tensor) -> torch.Tensor:
    """``[R, K]`` scatter index: a slot's id, or for an empty slot the row's first slot id (0 in a row without
    slots), so that a scatter writing each slot's value writes every column once (no duplicate races)."""
    first = ids.gather(1, (ids >= 0).to(torch.uint8).argmax(-1, keepdim=True)).clamp(min=0)
    return torch.where(ids >= 0, ids, first)


def scatter_slots(grad, index, ids, values) -> None:
    """Write ``values`` ``[R, K]`` at the slot columns of ``grad`` ``[R, V]``; empty slots write what their
    index column gets anyway (its first slot's value, or column 0's current value in a row without slots)."""
    valid = ids >= 0
    first = valid.to(torch.uint8).argmax(-1, keepdim=True)
    fill = torch.where(valid.any(-1, keepdim=True), values.gather(1, first), grad.gather(1, index[:, :1]))
    grad.scatter_(1, index, torch.where(valid, values, fill).to(grad.dtype))


def workspace_bytes(rows: int, vocab: int, dtype: torch.dtype, buffers: int) -> int:
    """Bytes :func:`torch_sparse_rows` allocates for ``rows`` rows of ``dtype`` logits: ``buffers`` ``[chunk, vocab]``
    buffers in the compute dtype (the exponentials, unless they go straight into a gradient buffer of that dtype,
    and their copy at T = 1 for a cross-entropy at T != 1)."""
    compute = torch.promote_types(dtype, torch.float32)
    return buffers * min(rows, max(1, CHUNK_ELEMENTS // vocab)) * vocab * compute.itemsize


def torch_sparse_rows(student, ids, logprobs, labels, opts, tail, vocab, scale=None, grad=None, chunk_rows=None):
    """:class:`SparseRows` of ``[N, W]`` logits, a chunk of rows at a time; with ``grad`` (``[N, W]``, may be
    the logits themselves), also writes each row's loss gradient times ``scale`` ``[N]`` (zeros past ``vocab``),
    computed in fp32 at least and rounded once where ``grad`` is narrower (the fused-linear form's bf16)."""
    n = student.shape[0]
    dtype = torch.promote_types(student.dtype, torch.float32)
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // vocab)
    t1 = labels is not None and opts.temperature != 1.0  # the cross-entropy's sums at T = 1 cost a pass
    # The exponentials go straight into the gradient buffer where they can: less memory, warmer caches.
    in_place = grad is not None and grad.dtype == dtype and grad.data_ptr() != student.data_ptr()
    work = torch.empty(int(not in_place) + t1, min(chunk_rows, n), vocab, dtype=dtype, device=student.device)
    if n == 0:
        return empty_rows(dtype, student.device, labels is not None)
    if grad is not None:
        grad[:, vocab:] = 0
    parts = []
    for start in range(0, n, chunk_rows):
        r = slice(start, min(start + chunk_rows, n))
        y, chunk_scale, chunk_grad = (None if x is None else x[r] for x in (labels, scale, grad))
        chunk_grad = None if chunk_grad is None else chunk_grad[:, :vocab]
        buffers = list(work[:, : r.stop - start].unbind(0))
        x = chunk_grad if in_place else buffers.pop(0)
        rows, state = _chunk(student[r, :vocab], ids[r], logprobs[r], y, opts, tail, x, *buffers)
        if chunk_grad is not None:  # the last write: the gradient may be the logits themselves
            _gradient(chunk_grad, chunk_scale, opts, *state)
        parts.append(rows)
    return SparseRows(*(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True)))


def _chunk(s, ids, logprobs, labels, opts: LossOptions, tail: bool, x, e1=None):
    """A chunk of rows ``[R, V]``: its :class:`SparseRows`, and what :func:`_gradient` needs.

    The tail is shifted by the row's max, not its own: a read pass (``max``) instead of a masked copy and a
    second max. Only where that underflows (a tail below e^-69 of the max) are rows redone with the tail's max.
    """
    index = fill_index(ids)
    at_index = s.gather(1, index).to(x.dtype)
    slot_logits = torch.where(ids >= 0, at_index, -math.inf)
    has_slot = (ids >= 0).any(-1, keepdim=True)
    tail_max, argmax = s.max(-1)
    tail_max = tail_max.to(x.dtype)
    tail_lsum, tail_lsum1 = _tail_sums(s, index, has_slot, x, e1, opts.temperature, shift_of(tail_max))
    under = (tail_lsum < UNDERFLOW) & ((ids >= 0).sum(-1) < s.shape[1])  # -inf is right without tail columns
    if bool(under.any()):  # rare; a host sync on CUDA, where this path is the fallback
        r = under.nonzero().squeeze(1)
        masked = s[r].to(x.dtype).scatter_(1, index[r], torch.where(has_slot[r], -math.inf, at_index[r]))
        tail_max[r] = masked.max(-1).values
        parts = [torch.empty_like(x[r]), None if e1 is None else torch.empty_like(x[r])]
        lsums = _tail_sums(s[r], index[r], has_slot[r], *parts, opts.temperature, shift_of(tail_max[r]))
        for buffer, part, lsum, value in zip((x, e1), parts, (tail_lsum, tail_lsum1), lsums, strict=True):
            if buffer is not None:
                buffer[r], lsum[r] = part, value
    slots = bucket_rows(slot_logits, ids, logprobs, tail_max, tail_lsum, argmax, opts, tail)
    lse1 = (slots.row_max, slots.log_sum) if e1 is None else total_log_sum(slot_logits, tail_max, tail_lsum1, 1.0)
    safe = None if labels is None else torch.where(labels == opts.ignore_index, 0, labels)
    s_y = None if safe is None else s.gather(1, safe[:, None]).squeeze(1).to(x.dtype)
    rows = SparseRows(slots.divergence, *lse1, slots.student_argmax, slots.teacher_top, s_y)
    return rows, (x, e1, slots, slot_logits, ids, index, safe, shift_of(tail_max), lse1)


def _tail_sums(s, index, has_slot, x, e1, temperature, shift):
    """Writes ``exp((s - shift) / T)`` into ``x`` (and ``exp(s - shift)`` into ``e1`` unless None), 0 at the
    slots; returns the log of their row sums (the second None without ``e1``)."""
    torch.sub(s, shift[:, None], out=x)
    x.scatter_(1, index, torch.where(has_slot, -math.inf, x.gather(1, index)))  # a row without slots: as it is
    lsum1 = None if e1 is None else torch.exp(x, out=e1).sum(-1).log()
    if temperature != 1.0:
        x.mul_(1.0 / temperature)
    return x.exp_().sum(-1).log(), lsum1


def _gradient(grad, scale, opts, e, e1, slots: SlotRows, slot_logits, ids, index, labels, tail_shift, lse1):
    """Writes a chunk's loss gradient times ``scale`` into ``grad``: the tail columns from their exponentials
    ``e`` (and ``e1``, at T = 1, when T != 1), then the slot columns over them."""
    a, b, h = tail_coefficients(slots, lse1, tail_shift, scale, opts)
    out = grad if grad.dtype == e.dtype else e  # straight into the gradient: no copy pass when dtypes agree
    torch.mul(e, a[:, None], out=out)
    if e1 is not None and opts.alpha < 1.0:
        out.add_(e1.mul_(b[:, None]))
    if opts.alpha < 1.0:
        out.scatter_add_(1, labels[:, None], -h[:, None].to(out.dtype))
    scatter_slots(out, index, ids, slot_values(slots, slot_logits, ids, labels, scale, opts, lse1))
    zero_rows(out, scale == 0)  # an ignored row gets exactly 0, even where its logits are inf or NaN
    if out is not grad:
        grad.copy_(out)


def torch_sparse_loss(student, ids, logprobs, labels, opts, tail, vocab, chunk_rows=None) -> DistillationOutput:
    want = torch.is_grad_enabled() and student.requires_grad
    return DistillationOutput(
        *_ChunkedSparse.apply(student, ids, logprobs, labels, opts, tail, vocab, chunk_rows, want)
    )


class _ChunkedSparse(torch.autograd.Function):
    """Chunked forward writing each row's loss gradient, which the backward rescales (as the dense path)."""

    @staticmethod
    def forward(ctx, student, ids, logprobs, labels, opts, tail, vocab, chunk_rows, want_grad):
        ctx.args = (opts, tail, vocab, chunk_rows)
        ctx.save_for_backward(student, ids, logprobs, labels)
        rows, ctx.grad = _forward(student, ids, logprobs, labels, *ctx.args, want_grad)
        output, _ = finish(rows, labels, opts)
        ctx.mark_non_differentiable(*output[1:])
        return tuple(output)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.grad is None:  # a second backward (gradcheck, retain_graph): recompute
            ctx.grad = _forward(*ctx.saved_tensors, *ctx.args, True)[1]
        grad, ctx.grad = ctx.grad, None
        if ctx.args[0].reduction != "none" and grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            return grad, *[None] * 8  # the common case costs no pass over the gradient
        factor = grad_loss.reshape(-1, 1) if ctx.args[0].reduction == "none" else grad_loss.reshape(1, 1)
        grad.mul_(factor.to(grad.dtype))
        zero_rows(grad, (factor == 0).reshape(-1).expand(grad.shape[0]))  # 0 * NaN would be NaN
        return grad, None, None, None, None, None, None, None, None


def _forward(student, ids, logprobs, labels, opts, tail, vocab, chunk_rows, want_grad):
    counted = row_targets(labels, None, opts, student.shape[0], student.device).counted
    divisor = counted.sum().clamp(min=1).to(torch.promote_types(student.dtype, torch.float32))
    grad = torch.empty_like(student) if want_grad else None
    scale = forward_row_scale(counted, divisor, opts.reduction)
    return torch_sparse_rows(student, ids, logprobs, labels, opts, tail, vocab, scale, grad, chunk_rows), grad
