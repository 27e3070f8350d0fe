"""Sparse teacher signals: the per-row bucket math both backends share, and the chunked PyTorch path.

A teacher given as K slots per token (ids, -1 for an empty slot, with log-probabilities at temperature T)
leaves only the student's row to stream over the vocabulary. A backend computes, per row, the student's
log-sum-exp over the columns that are not slots (the tail: its max, log sum exp((s - max) / T) and argmax),
with the slot columns masked out, never subtracted afterwards: 1 - sum(q over the slots) cancels to 0 or
garbage when the student is confident. The rest needs only the K slot logits: :func:`bucket_rows`, O(N K)
work that both backends call, so they cannot disagree on it.

Gradients (``SparseDistillationFunction`` in ``sparse.py`` has the derivation): with buckets b (the slots,
and with ``tail=True`` the rest), ``Q_b`` the student's mass, ``g_b = dD/dQ_b`` and ``S = sum_b Q_b g_b``,
``dD/da_u = q_u (g_b(u) - S)`` for a = s / T. A slot column's gradient is its bucket's ``Q_b (g_b - S)``; a
tail column's is ``r_u Q_tail (g_tail - S)`` with ``r_u = q_u / Q_tail``, the tail's own softmax.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .options import LossOptions
from .rows import DistillationOutput, RowStatistics, finish_rows, forward_row_scale, row_targets

#: Larger than any column index: the student argmax's "no candidate".
NO_COLUMN = 1 << 62
#: Elements per ``[chunk, V]`` workspace (4 MiB in fp32), as in the dense PyTorch path.
CHUNK_ELEMENTS = 1 << 20


def zero_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Set the rows of ``grad`` ``[R, V]`` where ``rows`` ``[R]`` is True to exactly 0 (NaN * 0 would be NaN);
    on CPU only those rows are touched, elsewhere a fill pass that needs no host sync."""
    if rows.device.type != "cpu":
        return grad.masked_fill_(rows[:, None], 0.0)
    if rows.any():
        grad[rows] = 0.0
    return grad


class SlotRows(NamedTuple):
    """The per-row results of :func:`bucket_rows` (``[R]`` unless noted; compute dtype).

    Attributes:
        divergence: D over the buckets at temperature T, without T² (0 in a row without teacher mass).
        row_max: max of the student's valid logits (raw).
        log_sum: log sum exp((s - row_max) / T) over the valid columns.
        tail_factor: a tail column's dD/da is ``tail_factor * exp((s - tail shift) / T)``.
        slot_grad: ``[R, K]`` dD/da at each slot's column (0 at empty slots).
        student_argmax: int64, first index of the student's max.
        teacher_top: int64, the id of the teacher's most likely slot (-1 without one).
    """

    divergence: torch.Tensor
    row_max: torch.Tensor
    log_sum: torch.Tensor
    tail_factor: torch.Tensor
    slot_grad: torch.Tensor
    student_argmax: torch.Tensor
    teacher_top: torch.Tensor


def shift_of(row_max: torch.Tensor) -> torch.Tensor:
    """The exponent shift of a row: its max, or 0 in an all -inf row (no -inf - -inf = NaN)."""
    return torch.where(row_max == -math.inf, 0.0, row_max)


def total_log_sum(slot_logits, tail_max, tail_lsum, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(max ``[R]``, log sum exp((s - max) / T) ``[R]``) of whole rows from the tail's pair and the ``[R, K]``
    slot logits (-inf at empty slots). The shift comes before the scaling, as in the dense backends."""
    row_max = torch.maximum(tail_max, slot_logits.amax(-1))
    shift = shift_of(row_max)
    tail_term = (tail_max - shift) * inv_t + tail_lsum
    terms = torch.cat([(slot_logits - shift[:, None]) * inv_t, tail_term[:, None]], -1)
    return row_max, torch.logsumexp(terms, -1)


def bucket_rows(slot_logits, ids, logprobs, tail_max, tail_lsum, tail_argmax, opts: LossOptions, tail: bool):
    """:class:`SlotRows` from the student's ``[R, K]`` slot logits (-inf at empty slots), the ``[R, K]`` ids
    and teacher log-probabilities, and the tail's max, log sum at T and argmax (``[R]`` each)."""
    inv_t = 1.0 / opts.temperature
    valid = ids >= 0
    row_max, log_sum = total_log_sum(slot_logits, tail_max, tail_lsum, inv_t)
    shift = shift_of(row_max)
    lq = (slot_logits - shift[:, None]) * inv_t - log_sum[:, None]
    lq_tail = (tail_max - shift) * inv_t + tail_lsum - log_sum
    lp = torch.where(valid, logprobs.to(lq.dtype), -math.inf)
    if tail:
        active = valid.any(-1)
        # In float64: the K log-probabilities' 1 - sum cancels, and near 0 reverse KL hangs on its value.
        lp_tail = torch.clamp(1.0 - lp.double().exp().sum(-1), min=0.0).log().to(lq.dtype)
    else:  # renormalized over the slots; a row without mass (log 0) has no soft term, NaN still propagates
        mass = torch.logsumexp(lp, -1)
        active = mass != -math.inf
        lp = lp - mass[:, None]
        lp_tail = torch.full_like(mass, -math.inf)
    div, grad = bucket_divergence(
        torch.cat([lp, lp_tail[:, None]], -1),
        torch.cat([lq, lq_tail[:, None]], -1),
        opts.resolved_divergence,
        opts.beta,
    )
    div = torch.where(active, div, 0.0)
    # The derivative of an infinite loss has no value: NaN in the whole row, as in the dense backends.
    grad = torch.where(active[:, None], grad, 0.0).masked_fill_((div == math.inf)[:, None], math.nan)
    slot_grad, tail_grad = grad[:, :-1], grad[:, -1]
    tail_factor = torch.where(tail_grad == 0, 0.0, tail_grad * (-tail_lsum).exp())
    return SlotRows(
        div,
        row_max,
        log_sum,
        tail_factor,
        slot_grad,
        _student_argmax(slot_logits, ids, tail_max, tail_argmax),
        _teacher_top(lp, ids),
    )


def bucket_divergence(lP, lQ, kind: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """D ``[R]`` and ``Q_b (g_b - S)`` ``[R, B]`` over buckets given as log-masses ``[R, B]`` (-inf for 0).

    g = dD/dQ with Q unconstrained: forward KL -P/Q, reverse KL log(Q/P) + 1, jsd (1-beta) log(Q/M), tvd
    sign(Q - P) / 2. The KLs use closed forms of Q (g - S), exact also where a bucket underflows.
    """
    P, Q = lP.exp(), lQ.exp()
    if kind == "forward_kl":
        return _weighted_log_ratio(P, lP, lQ), Q * P.sum(-1, keepdim=True) - P
    if kind == "reverse_kl":
        div = _weighted_log_ratio(Q, lQ, lP)
        return div, torch.where(Q != 0, Q * (lQ - lP - div[:, None]), 0.0)
    if kind == "jsd":
        lM = torch.logaddexp(lP + math.log(beta), lQ + math.log(1.0 - beta))
        q_g = (1.0 - beta) * torch.where(Q != 0, Q * (lQ - lM), 0.0)
        div = beta * _weighted_log_ratio(P, lP, lM) + q_g.sum(-1)
    elif kind == "tvd":
        div = 0.5 * (P - Q).abs().sum(-1)
        q_g = 0.5 * Q * torch.sign(Q - P)
    else:
        raise ValueError(f"sparse teachers support forward_kl, reverse_kl, jsd and tvd, not {kind!r}")
    return div, q_g - Q * q_g.sum(-1, keepdim=True)


def _weighted_log_ratio(w, log_x, log_y):
    """sum(w (log_x - log_y)) with 0 where w == 0 (not w > 0: a NaN weight propagates)."""
    return torch.where(w != 0, w * (log_x - log_y), 0.0).sum(-1)


def _student_argmax(slot_logits, ids, tail_max, tail_argmax):
    """First index of the row's max, as torch.argmax: the tail's, or the smallest slot id holding the max."""
    slot_max = slot_logits.amax(-1)
    holds = (slot_logits == slot_max[:, None]) & (ids >= 0)
    best_slot = torch.where(holds, ids, NO_COLUMN).amin(-1)
    best = torch.where(slot_max > tail_max, best_slot, tail_argmax)
    return torch.where(slot_max == tail_max, torch.minimum(best_slot, tail_argmax), best)


def _teacher_top(lp, ids):
    """The id of the first slot with the highest probability; -1 in a row without teacher mass."""
    top = ids.gather(1, lp.argmax(-1, keepdim=True)).squeeze(1)
    return torch.where(lp.amax(-1) > -math.inf, top, -1)


def fill_index(ids: torch.Tensor) -> torch.Tensor:
    """``[R, K]`` scatter index: a slot's id, or for an empty slot the row's first slot id (0 in a row without
    slots), so that a scatter writing each slot's value writes every column once (no duplicate races)."""
    valid = ids >= 0
    first = ids.gather(1, valid.to(torch.uint8).argmax(-1, keepdim=True)).clamp(min=0)
    return torch.where(valid, ids, first)


def scatter_slots(grad, index, ids, values) -> None:
    """Write ``values`` ``[R, K]`` at the slot columns of ``grad`` ``[R, V]``; empty slots write what their
    index column gets anyway (its first slot's value, or column 0's current value in a row without slots)."""
    valid = ids >= 0
    first = valid.to(torch.uint8).argmax(-1, keepdim=True)
    fill = torch.where(valid.any(-1, keepdim=True), values.gather(1, first), grad.gather(1, index[:, :1]))
    grad.scatter_(1, index, torch.where(valid, values, fill).to(grad.dtype))


class SparseRows(NamedTuple):
    """What the public function's epilogue needs per row, from either backend (``[R]`` each)."""

    divergence: torch.Tensor
    row_max: torch.Tensor  # of the raw logits
    log_sum: torch.Tensor  # log sum exp(s - row_max), T = 1 (the cross-entropy's)
    student_argmax: torch.Tensor
    teacher_top: torch.Tensor
    target_logit: torch.Tensor | None  # the student's logit at the label


def finish(rows: SparseRows, labels: torch.Tensor | None, opts: LossOptions) -> tuple[DistillationOutput, torch.Tensor]:
    """The reduced output and the mean's divisor: ``rows.finish_rows`` without a teacher cross-entropy."""
    targets = row_targets(labels, None, opts, rows.divergence.shape[0], rows.divergence.device)
    none = torch.zeros_like(rows.divergence)  # the teacher's log-sum-exp, read only for a teacher CE
    stats = RowStatistics(
        rows.divergence, rows.row_max, rows.log_sum, none, none, rows.student_argmax, rows.teacher_top
    )
    return finish_rows(stats, targets, rows.target_logit, None, opts)


def slot_values(slots: SlotRows, slot_logits, ids, labels, scale, opts: LossOptions, lse1) -> torch.Tensor:
    """``[R, K]`` the loss gradient at each slot column, times ``scale`` ``[R]`` (soft and hard terms)."""
    values = opts.alpha * opts.soft_scale / opts.temperature * slots.slot_grad if opts.alpha > 0 else 0.0
    if opts.alpha < 1.0:
        row_max, log_sum = lse1
        q1 = ((slot_logits - shift_of(row_max)[:, None]) - log_sum[:, None]).exp()
        values = values + (1.0 - opts.alpha) * (q1 - (ids == labels[:, None]).to(q1.dtype))
    return torch.where(scale[:, None] == 0, 0.0, values * scale[:, None])


def torch_sparse_rows(student, ids, logprobs, labels, opts, tail, vocab, scale=None, grad=None, chunk_rows=None):
    """:class:`SparseRows` of ``[N, W]`` logits, a chunk of rows at a time; with ``grad`` (``[N, W]``, may be
    the logits themselves), also writes each row's loss gradient times ``scale`` ``[N]`` (zeros past ``vocab``)."""
    n = student.shape[0]
    dtype = torch.promote_types(student.dtype, torch.float32)
    chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // vocab)
    t1 = labels is not None and opts.temperature != 1.0  # the cross-entropy's sums at T = 1 cost a pass
    work = torch.empty(1 + t1, min(chunk_rows, n), vocab, dtype=dtype, device=student.device)
    parts = []
    if n == 0:
        empty, index = torch.empty(0, dtype=dtype, device=student.device), torch.empty(0, dtype=torch.long)
        return SparseRows(empty, empty, empty, index, index, None if labels is None else empty)
    if grad is not None:
        grad[:, vocab:] = 0
    for start in range(0, n, chunk_rows):
        r = slice(start, min(start + chunk_rows, n))
        y = None if labels is None else labels[r]
        parts.append(
            _chunk(
                student[r, :vocab],
                ids[r],
                logprobs[r],
                y,
                opts,
                tail,
                work[:, : r.stop - start],
                None if scale is None else scale[r],
                None if grad is None else grad[r, :vocab],
            )
        )
    return SparseRows(*(None if p[0] is None else torch.cat(p) for p in zip(*parts, strict=True)))


def _chunk(s, ids, logprobs, labels, opts: LossOptions, tail: bool, work, scale, grad) -> SparseRows:
    inv_t = 1.0 / opts.temperature
    x, *rest = work.unbind(0)
    index = fill_index(ids)
    has_slot = (ids >= 0).any(-1, keepdim=True)
    at_index = s.gather(1, index).to(x.dtype)
    slot_logits = torch.where(ids >= 0, at_index, -math.inf)
    x.copy_(s).scatter_(1, index, torch.where(has_slot, -math.inf, at_index))  # the slots out of the tail
    tail_max, tail_argmax = x.max(-1)
    tail_shift = shift_of(tail_max)
    x.sub_(tail_shift[:, None])
    if rest:  # the tail's exponentials at T = 1, for the cross-entropy
        e1 = torch.exp(x, out=rest[0])
        tail_lsum1 = e1.sum(-1).log()
    if inv_t != 1.0:
        x.mul_(inv_t)
    e = x.exp_()  # 0 at the slot columns
    tail_lsum = e.sum(-1).log()
    slots = bucket_rows(slot_logits, ids, logprobs, tail_max, tail_lsum, tail_argmax, opts, tail)
    lse1 = (slots.row_max, slots.log_sum) if not rest else total_log_sum(slot_logits, tail_max, tail_lsum1, 1.0)
    safe = None if labels is None else torch.where(labels == opts.ignore_index, 0, labels)
    s_y = None if safe is None else s.gather(1, safe[:, None]).squeeze(1).to(x.dtype)
    if grad is not None:  # the last write: ``grad`` may be ``s`` itself
        _gradient(
            grad, e, rest[0] if rest else None, slots, slot_logits, ids, index, safe, scale, opts, tail_shift, lse1
        )
    return SparseRows(slots.divergence, *lse1, slots.student_argmax, slots.teacher_top, s_y)


def tail_coefficients(slots: SlotRows, lse1, tail_shift, scale, opts: LossOptions):
    """``[R]`` (a, b, h): a tail column u's loss gradient is ``a e_u + b e1_u - h [u = label]``, with
    ``e_u = exp((s_u - shift) / T)`` and ``e1_u = exp(s_u - shift)`` (b = 0 at T = 1, where e1 is e)."""
    zero = torch.zeros_like(scale)
    a = opts.alpha * opts.soft_scale / opts.temperature * slots.tail_factor * scale if opts.alpha > 0 else zero
    if opts.alpha == 1.0:
        return a, zero, zero
    hard = 1.0 - opts.alpha  # the cross-entropy's softmax at T = 1 is e1 exp(shift - max - log sum)
    q1 = hard * scale * (tail_shift - shift_of(lse1[0]) - lse1[1]).exp()
    return (a + q1, zero, hard * scale) if opts.temperature == 1.0 else (a, q1, hard * scale)


def _gradient(grad, e, e1, slots: SlotRows, slot_logits, ids, index, labels, scale, opts, tail_shift, lse1):
    """Writes a chunk's scaled loss gradient into ``grad``: the tail columns from their exponentials ``e``
    (and ``e1``, at T = 1, when T != 1), then the slot columns over them."""
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


def torch_sparse_loss(student, ids, logprobs, labels, opts, tail, vocab, chunk_rows=None):
    """The chunked PyTorch path on flattened inputs: ``(DistillationOutput, its fields as a tuple)``."""
    want = torch.is_grad_enabled() and student.requires_grad
    return DistillationOutput(
        *_ChunkedSparse.apply(student, ids, logprobs, labels, opts, tail, vocab, chunk_rows, want)
    )


class _ChunkedSparse(torch.autograd.Function):
    """Row-chunked forward that also writes each row's loss gradient; the backward rescales it (as the
    dense PyTorch path does: on a CPU recomputing the exponentials would cost more than keeping them)."""

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
        factor = grad_loss.reshape(-1, 1) if ctx.args[0].reduction == "none" else grad_loss.reshape(1, 1)
        grad.mul_(factor.to(grad.dtype))
        zero_rows(grad, (factor == 0).reshape(-1).expand(grad.shape[0]))  # 0 * NaN would be NaN
        return grad, None, None, None, None, None, None, None, None


def _forward(student, ids, logprobs, labels, opts, tail, vocab, chunk_rows, want_grad):
    n = student.shape[0]
    counted = row_targets(labels, None, opts, n, student.device).counted
    divisor = counted.sum().clamp(min=1).to(torch.promote_types(student.dtype, torch.float32))
    scale = forward_row_scale(counted, divisor, opts.reduction)
    grad = torch.empty_like(student) if want_grad else None
    rows = torch_sparse_rows(student, ids, logprobs, labels, opts, tail, vocab, scale, grad, chunk_rows)
    return rows, grad
