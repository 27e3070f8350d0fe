"""An independent float64 oracle: the definitions in DESIGN.md written out plainly, differentiated by autograd.

It shares no code with the package. It materializes everything, so it is only for small shapes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _weighted_log_ratio(w, log_x, log_y):
    """sum(w * (log_x - log_y)) over the last dim, with 0 where w == 0 (safe for autograd at zeros)."""
    pos = w > 0
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
    teacher_ce_weight=0.0,
    vocab_size=None,
    ignore_index=-100,
    reduction="mean",
):
    """Returns (loss, stats dict) computed in float64 from ``student``/``teacher`` (float64 leaves)."""
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
    hard_target = t.argmax(-1) if hard_labels == "teacher_argmax" else safe
    nan = torch.full((n,), float("nan"), dtype=torch.float64)
    hard = nan if hard_target is None else F.cross_entropy(s, hard_target, reduction="none")
    teacher_ce = nan if safe is None else F.cross_entropy(t, safe, reduction="none")
    rows = alpha * soft
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
