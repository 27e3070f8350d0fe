"""Each divergence's value and gradient on a chunk of rows, in PyTorch: the math of ``torch_backend.py``.

The softmaxes come first (``log_softmax_into``, ``shifted_logsumexp``). The divergences take the student's and
the teacher's log-probabilities and probabilities at temperature T, ``[R, V]`` each, which the caller has
written into reused buffers. The Triton counterpart is ``_pointwise_terms`` and the statistics kernel in
``triton_backend.py``; a new divergence goes into both.
"""

from __future__ import annotations

import math

import torch

from .options import LossOptions


def log_softmax_into(
    x: torch.Tensor, logp: torch.Tensor, probs: torch.Tensor, inv_t: float
) -> tuple[torch.Tensor, ...]:
    """Write log-softmax and softmax of ``x / T`` (``x`` ``[R, V]``) into ``logp`` / ``probs``, one exp per element.

    ``x`` may be ``logp`` itself. Returns (max of ``x`` ``[R]``, log sum exp((x - max) / T) ``[R]``, argmax of
    ``x`` ``[R]``): the log-sum-exp in two parts, whose sum would be rounded at the logits' magnitude (at T=1
    they are the cross-entropy's). The shift comes before the division by T: ``x - max`` is exact near the
    max, where ``x / T`` at logits of 1e3 is already rounded by 6e-5 in fp32 (and the max of x / T is max / T
    for T > 0). The argmax is ``x``'s own (first index), which rounding of x / T could turn into a tie.
    Log-probs are clamped at the dtype's lowest finite value so that a zero probability (a -inf logit) times its
    log-prob is 0, not NaN; NaN inputs still propagate.
    """
    peak, argmax = x.max(-1, keepdim=True)
    torch.sub(x, peak, out=logp)
    if inv_t != 1.0:
        logp.mul_(inv_t)
    torch.exp(logp, out=probs)
    log_total = _log1p_sum(probs, argmax)
    probs.div_(log_total.exp())
    logp.sub_(log_total).clamp_(min=torch.finfo(logp.dtype).min)
    return peak.squeeze(-1), log_total.squeeze(-1), argmax.squeeze(-1)


def _log1p_sum(terms: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """log(sum) ``[R, 1]`` of the shifted exponentials ``terms`` ``[R, V]``, whose max's own term is exactly 1.

    Summed as log1p(sum of the other terms): log(1 + rest) would round at 1 (6e-8 in fp32), which is all of a
    cross-entropy near 1e-6. ``top - 1`` is 0 unless the max is not finite (NaN then, which must propagate;
    -1 for an all -inf row shifted by 0, giving log(0)). Costs two scatters of R elements, no pass over V.
    """
    top = terms.gather(-1, argmax)
    terms.scatter_(-1, argmax, 0.0)
    rest = terms.sum(-1, keepdim=True)
    terms.scatter_(-1, argmax, top)
    return rest.add_(top - 1.0).log1p_()


def shifted_logsumexp(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(max ``[R]``, log sum exp(x - max) ``[R]``) of ``x`` ``[R, V]`` in ``dtype``; one ``[R, V]`` temporary."""
    peak, argmax = x.max(-1, keepdim=True)
    peak = peak.to(dtype)
    # An all -inf row keeps max -inf; shift by 0 then, as the Triton kernel does.
    shift = torch.where(torch.isinf(peak) & (peak < 0), 0.0, peak)
    log_sum = _log1p_sum((x.to(dtype) - shift).exp_(), argmax)
    return peak.squeeze(-1), log_sum.squeeze(-1)


def _row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product ``[R]`` of two ``[R, V]`` tensors (``bmm`` is 15x slower on CPU at these shapes)."""
    return torch.linalg.vecdot(x, y)


def _log_mixture(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """log(w e^la + (1 - w) e^lb) from (clamped) log-probabilities, stable where probabilities underflow."""
    lowest = torch.finfo(la.dtype).min
    return torch.logaddexp(
        la + math.log(w) if w > 0 else la.new_full((), lowest).expand_as(la),
        lb + math.log(1 - w) if w < 1 else lb.new_full((), lowest).expand_as(lb),
    ).clamp_(min=lowest)


def _infinite_where_banned(div: torch.Tensor, lp: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(q || p) is +inf in a row where p bans a token (a -inf logit, so a log-prob clamped to the lowest
    float) that q allows (q > 0). The clamped log-probabilities would give a huge finite number there
    instead (about q * 3.4e38); a merely tiny probability stays finite. Used both ways round: the teacher
    banning a token for KL(q || p), the student for KL(p || q)."""
    lowest = torch.finfo(lp.dtype).min
    # On CPU one reduction tells whether any token is banned (rarely): the full check is then skipped.
    if lp.device.type == "cpu" and not bool(lp.amin(-1).eq(lowest).any()):
        return div
    banned = lp == lowest
    return torch.where((banned & (q > 0)).any(-1), math.inf, div)


#: |x| below which x - log1p(x) is summed as its series (whose next term is then below 3e-7 of the sum).
SERIES_BOUND = 0.1


def _skew_reverse_kl_terms(lq, lp, q, p, mix: float, scratch):
    """Row divergence ``[R]`` and q * g ``[R, V]`` of KL(q || m), m = skew * q + (1 - skew) * p.

    With x = (1 - skew) (p / q - 1), log(q / m) = -log1p(x), and since sum(q x) = (1 - skew) sum(p - q) = 0,
    D = sum q (x - log1p(x)): every term is >= 0, so nothing cancels as skew nears 1 (where q log(q / m)
    sums terms of size (1 - skew) to a total of size (1 - skew)²). Columns where x is not small, or q is 0,
    use q log(q / m) + (1 - skew)(p - q) instead. Likewise g = log(q / m) + 1 - skew q / m, less the
    constant 1 - skew (which cancels in the softmax Jacobian), is -log1p(x) + skew x / (1 + x).
    """
    lm = _log_mixture(lq, lp, mix)
    x = torch.sub(lp, lq, out=scratch).expm1_().mul_(1.0 - mix)
    small = x.abs() < SERIES_BOUND
    xs = torch.where(small, x, 0.0)
    # x²/2 - x³/3 + x⁴/4 - x⁵/5 + x⁶/6 - x⁷/7, in Horner form
    series = xs * xs * (0.5 + xs * (-1 / 3 + xs * (0.25 + xs * (-0.2 + xs * (1 / 6 - xs / 7)))))
    log_ratio = torch.where(q > 0, lq - lm, 0.0)
    term = torch.where(small, q * series, q * log_ratio + (1.0 - mix) * (p - q))
    g_small = torch.log1p(xs).neg_().add_(mix * xs / (1.0 + xs))
    q_g_large = q * log_ratio - mix * (2 * lq - lm).exp_() + mix * q
    return term.sum(-1), torch.where(small, q * g_small, q_g_large)


def divergence_and_gradient(opts: LossOptions, lq, lp, q, p, scratch, grad):
    """Row divergence ``[R]``; if ``grad`` is given, writes dD/da (a = student logits / T) into it.

    Where a row's divergence is +inf (a -inf logit on one side where the other side has mass), its gradient
    is NaN in every column, as on the Triton backend: the derivative of an infinite loss has no value, and a
    NaN cannot pass for a step (the closed forms would give a mix of ±inf, NaN and finite entries).
    """
    div = _divergence_and_gradient(opts, lq, lp, q, p, scratch, grad)
    infinite = torch.isposinf(div)
    if grad is None:
        return div
    if infinite.device.type != "cpu":  # no host sync: a fill pass over the chunk
        grad.masked_fill_(infinite.unsqueeze(1), math.nan)
    elif infinite.any():  # rare: on CPU only the infinite rows are touched
        grad[infinite] = math.nan
    return div


def _divergence_and_gradient(opts: LossOptions, lq, lp, q, p, scratch, grad):
    """Row divergence ``[R]`` and, into ``grad`` unless it is None, dD/da (a = student logits / T).

    Differences of log-probs are formed before the row sums (not as a difference of two sums, which
    cancels catastrophically in fp32 when the distributions are close).

    For the KLs the gradient is closed-form. For the others, with g = dD/dq taken with q unconstrained,
    the softmax Jacobian gives dD/da = q * g - q * sum(q * g).
    """
    kind, mix = opts.resolved_divergence, opts.mix
    if kind == "forward_kl":
        if grad is not None:
            torch.sub(q, p, out=grad)
        return _infinite_where_banned(_row_dot(p, torch.sub(lp, lq, out=scratch)), lq, p)
    if kind == "reverse_kl":
        log_ratio = torch.sub(lq, lp, out=scratch)
        div = _infinite_where_banned(_row_dot(q, log_ratio), lp, q)
        if grad is not None:
            torch.sub(log_ratio, div.unsqueeze(1), out=grad).mul_(q)
        return div

    # q * g is formed directly (in log space where needed): at skew 0, q * p / m tends to p as q underflows.
    if kind == "jsd":
        lm = _log_mixture(lp, lq, mix)
        q_g = (lq - lm).mul_(q).mul_(1.0 - mix)  # g = (1 - beta) log(q / m)
        div = mix * _row_dot(p, torch.sub(lp, lm, out=scratch)) + q_g.sum(-1)  # sum(q g) = (1 - beta) KL(q || m)
    elif kind == "skew_forward_kl":
        lm = _log_mixture(lp, lq, mix)
        div = _row_dot(p, torch.sub(lp, lm, out=scratch))
        if mix == 0:  # m = q: forward KL
            div = _infinite_where_banned(div, lq, p)
        q_g = (lq + lp - lm).exp_().mul_(-(1.0 - mix))  # g = -(1 - skew) p / m
    elif kind == "skew_reverse_kl":
        div, q_g = _skew_reverse_kl_terms(lq, lp, q, p, mix, scratch)
        if mix == 0:  # m = p: reverse KL
            div = _infinite_where_banned(div, lp, q)
    else:  # tvd
        diff = q - p
        div = 0.5 * diff.abs().sum(-1)
        q_g = diff.sign_().mul_(q).mul_(0.5)
    if grad is not None:
        torch.mul(q, q_g.sum(-1, keepdim=True), out=grad).neg_().add_(q_g)
    return div
