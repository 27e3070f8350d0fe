"""An independent float64 oracle: the definitions in DESIGN.md written out plainly, differentiated by autograd.

It shares no code with the package. It materializes everything, so it is only for small shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _weighted_log_ratio(w, log_x, log_y):
    """sum(w * (log_x - log_y)) over the last dim, with 0 where w == 0 (safe for autograd at zeros)."""
    pos = w != 0  # not w > 0: a NaN weight must propagate
    diff = torch.where(pos, log_x, 0.0) - torch.where(pos, log_y, 0.0)
    return torch.where(pos, w * diff, 0.0).sum(-1)


def _log_mixture(log_x, log_y, weight):
    """log(weight * x + (1 - weight) * y) from log-probabilities (exact where probabilities underflow)."""
    neg_inf = torch.full_like(log_x, -math.inf)
    a = log_x + math.log(weight) if weight > 0 else neg_inf
    b = log_y + math.log(1 - weight) if weight < 1 else neg_inf
    both = torch.isinf(a) & torch.isinf(b)  # keeps logaddexp's gradient free of 0/0
    return torch.where(both, -math.inf, torch.logaddexp(torch.where(both, 0.0, a), torch.where(both, 0.0, b)))


def divergence(name, s, t, *, beta=0.5, skew=0.1):
    """Per-row divergence of student scaled logits ``s`` from teacher scaled logits ``t`` (float64)."""
    lq, lp = F.log_softmax(s, -1), F.log_softmax(t, -1)
    q, p = lq.exp(), lp.exp()
    if name == "forward_kl" or (name == "jsd" and beta == 0):
        return _weighted_log_ratio(p, lp, lq)
    if name == "reverse_kl" or (name == "jsd" and beta == 1):
        return _weighted_log_ratio(q, lq, lp)
    if name == "jsd":
        lm = _log_mixture(lp, lq, beta)
        return beta * _weighted_log_ratio(p, lp, lm) + (1 - beta) * _weighted_log_ratio(q, lq, lm)
    if name == "skew_forward_kl":
        return _weighted_log_ratio(p, lp, _log_mixture(lp, lq, skew))
    if name == "skew_reverse_kl":
        return _weighted_log_ratio(q, lq, _log_mixture(lq, lp, skew))
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise ValueError(name)


def oracle(
    student,
    teacher,
    labels=None,
    *,
    divergence_name="forward_kl",
    beta=0.5,
    skew=0.1,
    temperature=1.0,
    t2_scaling=True,
    alpha=1.0,
    hard_labels="labels",
    label_weight=0.0,
    teacher_ce_weight=0.0,
    vocab_size=None,
    ignore_index=-100,
    reduction="mean",
):
    """Returns (loss, stats dict) computed in float64 from ``student``/``teacher`` (float64 leaves).

    ``label_weight`` w (DESIGN, README): with ``hard_labels="teacher_argmax"`` the hard term is
    ``(1 - w) * CE(s, argmax t) + w * CE(s, labels)``, a term of weight 0 left out (not 0 * inf); with
    ``hard_labels="labels"`` both cross-entropies are on the labels, so w changes nothing.
    """
    vocab = vocab_size or student.shape[-1]
    s = student.reshape(-1, student.shape[-1])[:, :vocab]
    t = teacher.reshape(-1, teacher.shape[-1])[:, :vocab]
    n = s.shape[0]
    div = divergence(divergence_name, s / temperature, t.detach() / temperature, beta=beta, skew=skew)
    soft = div * (temperature**2 if t2_scaling else 1.0)
    if labels is None:
        counted = torch.ones(n, dtype=torch.bool)
        flat_labels = None
    else:
        flat_labels = labels.reshape(-1)
        counted = flat_labels != ignore_index
    safe = None if flat_labels is None else torch.where(counted, flat_labels, 0)
    nan = torch.full((n,), float("nan"), dtype=torch.float64)

    def student_ce(target):
        return nan if target is None else F.cross_entropy(s, target, reduction="none")

    hard = student_ce(safe)
    if hard_labels == "teacher_argmax" and label_weight == 0:
        hard = student_ce(t.argmax(-1))
    elif hard_labels == "teacher_argmax" and label_weight < 1:
        hard = (1 - label_weight) * student_ce(t.argmax(-1)) + label_weight * student_ce(safe)
    teacher_ce = nan if safe is None else F.cross_entropy(t, safe, reduction="none")
    rows = alpha * soft if alpha > 0 else torch.zeros_like(soft)  # alpha = 0: no soft term (not 0 * inf)
    if alpha < 1:
        rows = rows + (1 - alpha) * hard
    if teacher_ce_weight > 0:
        rows = rows + teacher_ce_weight * teacher_ce
    rows = torch.where(counted, rows, 0.0)
    count = int(counted.sum())
    if reduction == "mean":
        loss = rows.sum() / max(count, 1)
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.reshape(student.shape[:-1])

    def mean(x):
        return (torch.where(counted, x, 0.0).sum() / max(count, 1)).detach()

    stats = {
        "soft": mean(soft),
        "hard": mean(hard),
        "teacher_ce": mean(teacher_ce),
        "agreement": mean((s.argmax(-1) == t.argmax(-1)).double()),
        "num_tokens": count,
    }
    return loss, stats


def sparse_oracle(
    student,
    teacher_ids,
    teacher_logprobs,
    labels=None,
    *,
    tail=False,
    divergence_name="forward_kl",
    beta=0.5,
    temperature=1.0,
    t2_scaling=True,
    alpha=1.0,
    vocab_size=None,
    ignore_index=-100,
    reduction="mean",
):
    """The sparse-teacher loss in float64 from its definition: (loss, stats dict); ``student`` a float64 leaf.

    Buckets: the K slots and, with ``tail``, the rest (teacher ``max(0, 1 - sum p)``, student ``q`` summed
    over the tokens outside the slots). Without ``tail`` the slots' probabilities are renormalized.
    """
    vocab = vocab_size or student.shape[-1]
    s = student.reshape(-1, student.shape[-1])[:, :vocab]
    ids = teacher_ids.reshape(s.shape[0], -1).long()
    lp = teacher_logprobs.reshape(ids.shape).double()
    n = s.shape[0]
    valid = ids >= 0
    safe = torch.where(valid, ids, 0)
    lq = F.log_softmax(s / temperature, -1)
    lq_slots = torch.where(valid, lq.gather(1, safe), -math.inf)
    lp = torch.where(valid, lp, -math.inf)
    if tail:
        outside = torch.zeros_like(s).scatter_add(1, safe, valid.double()) == 0
        q_tail = (lq.exp() * outside).sum(-1)
        p_tail = (1 - lp.exp().sum(-1)).clamp(min=0)
        lQ = torch.cat([lq_slots, q_tail.log()[:, None]], -1)
        lP = torch.cat([lp, p_tail.log()[:, None]], -1)
        active = valid.any(-1)
    else:
        mass = torch.logsumexp(lp, -1)
        active = mass != -math.inf
        lQ, lP = lq_slots, torch.where(active[:, None], lp - mass[:, None], -math.inf)
    P, Q = lP.exp(), lQ.exp()
    if divergence_name == "forward_kl" or (divergence_name == "jsd" and beta == 0):
        div = _weighted_log_ratio(P, lP, lQ)
    elif divergence_name == "reverse_kl" or (divergence_name == "jsd" and beta == 1):
        div = _weighted_log_ratio(Q, lQ, lP)
    elif divergence_name == "jsd":
        lM = _log_mixture(lP, lQ, beta)
        div = beta * _weighted_log_ratio(P, lP, lM) + (1 - beta) * _weighted_log_ratio(Q, lQ, lM)
    elif divergence_name == "tvd":
        div = 0.5 * (P - Q).abs().sum(-1)
    else:
        raise ValueError(divergence_name)
    soft = torch.where(active, div, 0.0) * (temperature**2 if t2_scaling else 1.0)
    counted = torch.ones(n, dtype=torch.bool) if labels is None else labels.reshape(-1) != ignore_index
    safe_labels = None if labels is None else torch.where(counted, labels.reshape(-1), 0)
    nan = torch.full((n,), math.nan, dtype=torch.float64)
    hard = nan if safe_labels is None else F.cross_entropy(s, safe_labels, reduction="none")
    rows = alpha * soft if alpha > 0 else torch.zeros_like(soft)
    if alpha < 1:
        rows = rows + (1 - alpha) * hard
    rows = torch.where(counted, rows, 0.0)
    count = int(counted.sum())
    if reduction == "mean":
        loss = rows.sum() / max(count, 1)
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.reshape(student.shape[:-1])

    def mean(x):
        return (torch.where(counted, x, 0.0).sum() / max(count, 1)).detach()

    top = ids.gather(1, lp.argmax(-1, keepdim=True)).squeeze(1)
    top = torch.where(lp.amax(-1) > -math.inf, top, -1)
    stats = {
        "soft": mean(soft),
        "hard": mean(hard),
        "teacher_ce": mean(nan),  # no teacher logits: NaN (0 when no token counts, as every mean)
        "agreement": mean((s.argmax(-1) == top).double()),
        "num_tokens": count,
    }
    return loss, stats
