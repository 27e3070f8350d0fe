"""Sparse teacher signals: the per-row bucket math both backends share (as ``rows.py`` for the dense loss).

A teacher given as K slots per token (ids, -1 for an empty slot, with log-probabilities at temperature T)
leaves only the student's row to stream over the vocabulary. A backend computes per row the log-sum-exp of
the tail, the columns that are no slot (its max, log sum exp((s - max) / T), argmax), with the slots masked
out, never subtracted afterwards: 1 - sum(q over the slots) cancels when the student is confident. The rest
needs only the K slot logits: :func:`bucket_rows`, O(N K) work both backends call.

The math per row, a = s / T, q = softmax(a) over the real vocabulary. Buckets b: the K slots and, with
``tail=True``, the tail. Teacher masses P_b (tail: max(0, 1 - sum p); ``tail=False``: p renormalized, no
tail), student masses Q_b = sum of q over b; D = D(P, Q) over the buckets. With g_b = dD/dQ_b (Q
unconstrained) and S = sum_b Q_b g_b, the softmax Jacobian gives dD/da_u = q_u (g_b(u) - S), so:
  slot column j: Q_j (g_j - S), its bucket being that one column;
  tail column u: r_u Q_tail (g_tail - S), r_u = q_u / Q_tail = exp((s_u - tail max) / T - tail log sum).
Q_b (g_b - S) is Q_b sum(P) - P_b (forward KL), Q_b (log Q_b - log P_b - D) (reverse KL), and h_b - Q_b
sum(h) with h_b = (1 - beta) Q_b log(Q_b / M_b) (jsd) or Q_b sign(Q_b - P_b) / 2 (tvd). The loss's gradient
in s is alpha c / T times that (c = T² or 1) plus (1 - alpha) (softmax(s) - onehot(label)), at T = 1.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .options import LossOptions
from .rows import DistillationOutput, RowStatistics, finish_rows, row_targets

NO_COLUMN = 1 << 62  # past every column: the student argmax's "no candidate"


class SlotRows(NamedTuple):
    """The per-row results of :func:`bucket_rows` (``[R]`` unless noted; compute dtype)."""

    divergence: torch.Tensor  # D over the buckets at T, without T² (0 in a row without teacher mass)
    row_max: torch.Tensor  # max of the student's valid logits (raw)
    log_sum: torch.Tensor  # log sum exp((s - row_max) / T) over the valid columns
    tail_factor: torch.Tensor  # a tail column's dD/da is tail_factor * exp((s - tail shift) / T)
    slot_grad: torch.Tensor  # [R, K] dD/da at each slot's column (0 at empty slots)
    student_argmax: torch.Tensor  # int64, first index of the student's max
    teacher_top: torch.Tensor  # int64, the id of the teacher's most likely slot (-1 without one)


def shift_of(row_max: torch.Tensor) -> torch.Tensor:  # a row's max, or 0 in an all -inf row (not NaN)
    return torch.where(row_max == -math.inf, 0.0, row_max)


def total_log_sum(slot_logits, tail_max, tail_lsum, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(max ``[R]``, log sum exp((s - max) / T) ``[R]``) of whole rows from the tail's pair and the ``[R, K]``
    slot logits (-inf at empty slots). The shift comes before the scaling, as in the dense backends."""
    row_max = torch.maximum(tail_max, slot_logits.amax(-1))
    shift = shift_of(row_max)
    terms = torch.cat([(slot_logits - shift[:, None]) * inv_t, ((tail_max - shift) * inv_t + tail_lsum)[:, None]], -1)
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
    lP, lQ = torch.cat([lp, lp_tail[:, None]], -1), torch.cat([lq, lq_tail[:, None]], -1)
    div, grad = bucket_divergence(lP, lQ, opts.resolved_divergence, opts.beta)
    div = torch.where(active, div, 0.0)
    # The derivative of an infinite loss has no value: NaN in the whole row, as in the dense backends.
    grad = torch.where(active[:, None], grad, 0.0).masked_fill_((div == math.inf)[:, None], math.nan)
    slot_grad, tail_grad = grad[:, :-1], grad[:, -1]
    tail_factor = torch.where(tail_grad == 0, 0.0, tail_grad * (-tail_lsum).exp())
    student_argmax = _student_argmax(slot_logits, ids, tail_max, tail_argmax)
    return SlotRows(div, row_max, log_sum, tail_factor, slot_grad, student_argmax, _teacher_top(lp, ids))


def bucket_divergence(lP, lQ, kind: str, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """D ``[R]`` and ``Q_b (g_b - S)`` ``[R, B]`` over buckets given as log-masses ``[R, B]`` (-inf for 0).

    The KLs use closed forms of Q (g - S) (see the module docstring), exact also where a bucket underflows.
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


def _weighted_log_ratio(w, log_x, log_y):  # 0 where w == 0 (not w > 0: a NaN weight propagates)
    return torch.where(w != 0, w * (log_x - log_y), 0.0).sum(-1)


def _student_argmax(slot_logits, ids, tail_max, tail_argmax):  # the first index of the max, as torch.argmax
    slot_max = slot_logits.amax(-1)
    holds = (slot_logits == slot_max[:, None]) & (ids >= 0)
    best_slot = torch.where(holds, ids, NO_COLUMN).amin(-1)
    best = torch.where(slot_max > tail_max, best_slot, tail_argmax)
    return torch.where(slot_max == tail_max, torch.minimum(best_slot, tail_argmax), best)


def _teacher_top(lp, ids):  # the id of the first most likely slot; -1 in a row without teacher mass
    top = ids.gather(1, lp.argmax(-1, keepdim=True)).squeeze(1)
    return torch.where(lp.amax(-1) > -math.inf, top, -1)


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
    unused = torch.zeros_like(rows.divergence)  # the teacher's log-sum-exp, read only for a teacher CE
    stats = RowStatistics(*rows[:3], unused, unused, rows.student_argmax, rows.teacher_top)
    return finish_rows(stats, targets, rows.target_logit, None, opts)


def empty_rows(dtype, device, labels: bool) -> SparseRows:
    empty, index = torch.empty(0, dtype=dtype, device=device), torch.empty(0, dtype=torch.long, device=device)
    return SparseRows(empty, empty, empty, index, index, empty if labels else None)


def slot_values(slots: SlotRows, slot_logits, ids, labels, scale, opts: LossOptions, lse1) -> torch.Tensor:
    """``[R, K]`` the loss gradient at each slot column, times ``scale`` ``[R]`` (soft and hard terms)."""
    values = opts.alpha * opts.soft_scale / opts.temperature * slots.slot_grad if opts.alpha > 0 else 0.0
    if opts.alpha < 1.0:
        row_max, log_sum = lse1
        q1 = ((slot_logits - shift_of(row_max)[:, None]) - log_sum[:, None]).exp()
        values = values + (1.0 - opts.alpha) * (q1 - (ids == labels[:, None]).to(q1.dtype))
    return torch.where(scale[:, None] == 0, 0.0, values * scale[:, None])


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
