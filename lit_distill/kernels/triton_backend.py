"""Fused softmax-divergence kernels over full-vocabulary logits (Triton).

Passes over the two logit rows, per divergence:
  forward_kl, reverse_kl                 2: statistics (+ loss, online) in the forward; gradient in the backward
  jsd, skew_forward_kl, skew_reverse_kl  3: statistics, then loss and sum(q * dD/dq) in the forward;
  tvd                                       gradient in the backward
Each pass reads both rows once; the backward writes the gradient once, already multiplied by grad_output,
so no ``[N, V]`` buffer lives between forward and backward and gradient accumulation costs nothing extra.

Set ``TRITON_INTERPRET=1`` before this module is imported to run the kernels on CPU tensors
(``backend.py`` decides without importing it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .inputs import FlatInputs
from .options import DIVERGENCE_CODES, LossOptions
from .rows import DistillationOutput, RowStatistics, finish_rows, gather_target_logits, row_grad_scale, row_targets

# The kernels' divergence codes, from the one table in options.py.
FORWARD_KL = tl.constexpr(DIVERGENCE_CODES["forward_kl"])
REVERSE_KL = tl.constexpr(DIVERGENCE_CODES["reverse_kl"])
JSD = tl.constexpr(DIVERGENCE_CODES["jsd"])
SKEW_FORWARD_KL = tl.constexpr(DIVERGENCE_CODES["skew_forward_kl"])
SKEW_REVERSE_KL = tl.constexpr(DIVERGENCE_CODES["skew_reverse_kl"])
TVD = tl.constexpr(DIVERGENCE_CODES["tvd"])
#: Divergences whose loss is accumulated online in the statistics pass (no second forward pass).
ONLINE_DIVERGENCES = ("forward_kl", "reverse_kl")


class StatRows(NamedTuple):
    """The rows of the fp32 statistics buffer ``[STATS_ROWS, N]``, in order: the host's view of the buffer.

    Each log-sum-exp is kept as a max and log sum exp(x - max): their sum would be rounded at the logits'
    magnitude (an fp32 ulp is 6e-5 at 1e3), more than a confident token's whole cross-entropy.
    """

    divergence: torch.Tensor  # D at temperature T
    max_a: torch.Tensor  # max(s / T)
    lsum_a: torch.Tensor  # log sum exp(s / T - max_a)
    max_b: torch.Tensor  # max(t / T)
    lsum_b: torch.Tensor  # log sum exp(t / T - max_b)
    max_s: torch.Tensor  # max(s)
    lsum_s: torch.Tensor  # log sum exp(s - max_s)
    max_t: torch.Tensor  # max(t)
    lsum_t: torch.Tensor  # log sum exp(t - max_t)
    q_dot_g: torch.Tensor  # sum(q * dD/dq), three-pass divergences only


STATS_ROWS = len(StatRows._fields)
# The kernels' indices of the same rows, by name.
STAT_DIVERGENCE = tl.constexpr(StatRows._fields.index("divergence"))
STAT_MAX_A = tl.constexpr(StatRows._fields.index("max_a"))
STAT_LSUM_A = tl.constexpr(StatRows._fields.index("lsum_a"))
STAT_MAX_B = tl.constexpr(StatRows._fields.index("max_b"))
STAT_LSUM_B = tl.constexpr(StatRows._fields.index("lsum_b"))
STAT_MAX_S = tl.constexpr(StatRows._fields.index("max_s"))
STAT_LSUM_S = tl.constexpr(StatRows._fields.index("lsum_s"))
STAT_MAX_T = tl.constexpr(StatRows._fields.index("max_t"))
STAT_LSUM_T = tl.constexpr(StatRows._fields.index("lsum_t"))
STAT_Q_DOT_G = tl.constexpr(StatRows._fields.index("q_dot_g"))


@triton.jit
def _online_logsumexp(x, running_max, running_sum):
    """Fold a block ``x`` (masked entries -inf) into a running (max, sum of exp(x - max)).

    Returns the new max and sum, the block's exp(x - new max) and the factor that rescaled the old sum.
    """
    new_max = tl.maximum(running_max, tl.max(x, 0))
    # A row that is all -inf so far keeps max -inf; shift by 0 then to avoid -inf - -inf = NaN.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp(running_max - shift)
    e = tl.exp(x - shift)
    return new_max, running_sum * rescale + tl.sum(e, 0), e, rescale


@triton.jit
def _log_probs(x, stats_ptr, n_rows, row, STAT_MAX: tl.constexpr, STAT_LSUM: tl.constexpr):
    """log softmax from the stored (max, log sum exp(x - max)) pair: (x - max) - lsum, never x - lse,
    whose lse is rounded at the logits' magnitude."""
    return (x - tl.load(stats_ptr + STAT_MAX * n_rows + row)) - tl.load(stats_ptr + STAT_LSUM * n_rows + row)


@triton.jit
def _log_mixture(la, lb, w):
    """log(w e^la + (1 - w) e^lb) from log-probabilities, stable where the probabilities underflow.

    Mixing in probability space would give log(0) = -inf wherever both probabilities underflow in fp32
    (a logit of -1e4), although the mixture's log is finite; -inf only where both inputs are -inf.
    """
    x = la + tl.log(w)
    y = lb + tl.log(1.0 - w)
    top = tl.maximum(x, y)
    shift = tl.where(top == float("-inf"), 0.0, top)
    return shift + tl.log(tl.exp(x - shift) + tl.exp(y - shift))


@triton.jit
def _expm1(d):
    """exp(d) - 1 to a few ulps also for small d (Kahan's trick: the rounding of exp(d) cancels out)."""
    u = tl.exp(d)
    um1 = u - 1.0
    return tl.where(u == 1.0, d, tl.where(um1 == -1.0, -1.0, um1 * d / tl.log(u)))


@triton.jit
def _log1p(x):
    """log(1 + x) to a few ulps also for small x (Goldberg's trick: 1 + x rounded, then corrected)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * x / (u - 1.0))


@triton.jit
def _pointwise_terms(lq, lp, mix, DIVERGENCE: tl.constexpr):
    """Per-column divergence term and q * g, g = dD/dq (q unconstrained), for the three-pass divergences.

    ``lq``/``lp`` are the student's / teacher's log-probabilities at temperature T (-inf where masked).
    q * g is formed in log space: at skew 0, q * p / m tends to p, not 0, as q underflows.
    """
    q = tl.exp(lq)
    p = tl.exp(lp)
    if DIVERGENCE == JSD:
        lm = _log_mixture(lp, lq, mix)
        term = mix * tl.where(p == 0.0, 0.0, p * (lp - lm)) + (1.0 - mix) * tl.where(q == 0.0, 0.0, q * (lq - lm))
        q_g = tl.where(q == 0.0, 0.0, (1.0 - mix) * q * (lq - lm))  # g = (1 - beta) log(q / m)
    elif DIVERGENCE == SKEW_FORWARD_KL:
        lm = _log_mixture(lp, lq, mix)
        term = tl.where(p == 0.0, 0.0, p * (lp - lm))
        q_g = tl.where(p == 0.0, 0.0, -(1.0 - mix) * tl.exp(lq + lp - lm))  # g = -(1 - skew) p / m
    elif DIVERGENCE == SKEW_REVERSE_KL:
        # With x = (1 - skew)(p/q - 1): log(q/m) = -log1p(x) and sum(q x) = 0, so D = sum q (x - log1p(x)),
        # terms >= 0 that do not cancel as skew nears 1; columns where x is not small, or q is 0, take
        # q log(q/m) + (1 - skew)(p - q). g = log(q/m) + 1 - skew q/m, less the constant 1 - skew (which
        # cancels in the softmax Jacobian), is -log1p(x) + skew x / (1 + x). See torch_divergence.py.
        lm = _log_mixture(lq, lp, mix)
        x = (1.0 - mix) * _expm1(lp - lq)
        small = tl.abs(x) < 0.1
        xs = tl.where(small, x, 0.0)
        series = xs * xs * (0.5 + xs * (-1.0 / 3.0 + xs * (0.25 + xs * (-0.2 + xs * (1.0 / 6.0 - xs / 7.0)))))
        log_ratio = tl.where(q == 0.0, 0.0, lq - lm)
        term = tl.where(small, q * series, q * log_ratio + (1.0 - mix) * (p - q))
        g_small = mix * xs / (1.0 + xs) - _log1p(xs)
        q_g_large = tl.where(q == 0.0, 0.0, q * log_ratio - mix * tl.exp(2.0 * lq - lm)) + mix * q
        q_g = tl.where(small, q * g_small, q_g_large)
    else:  # TVD
        term = 0.5 * tl.abs(p - q)
        q_g = 0.5 * q * tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
    return term, q_g, q


@triton.jit
def _row_stats_kernel(
    s_ptr,  # [N, *] student logits, row stride s_stride, unit column stride
    t_ptr,  # [N, *] teacher logits, row stride t_stride
    stats_ptr,  # [STATS_ROWS, N] fp32 out: divergence (online kinds), (max, lsum) at T (a, b) and at 1 (s, t)
    argmax_ptr,  # [2, N] int64 out: student argmax, teacher argmax
    s_stride,
    t_stride,
    n_rows,
    vocab,  # valid columns; those at or past it are padding
    inv_t,
    DIVERGENCE: tl.constexpr,
    SAME_T: tl.constexpr,  # T == 1: the T=1 statistics equal the tempered ones
    BLOCK: tl.constexpr,
):
    """Pass 1, one program per row: online logsumexp of both rows at T and at 1, argmaxes, online KL."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    offs = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    max_a = tl.full([], neg_inf, tl.float32)
    max_b = tl.full([], neg_inf, tl.float32)
    max_s = tl.full([], neg_inf, tl.float32)
    max_t = tl.full([], neg_inf, tl.float32)
    sum_a = tl.zeros([], tl.float32)
    sum_b = tl.zeros([], tl.float32)
    sum_s = tl.zeros([], tl.float32)
    sum_t = tl.zeros([], tl.float32)
    kl_acc = tl.zeros([], tl.float32)  # forward: sum e_b (b - a); reverse: sum e_a (a - b)
    arg_a = tl.zeros([], tl.int32)
    arg_b = tl.zeros([], tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        mask = cols < vocab
        # fp32 right after the load: bf16 arithmetic is wrong under the interpreter and lossy anyway.
        s = tl.load(s_row + cols, mask=mask, other=neg_inf).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=neg_inf).to(tl.float32)
        a = s * inv_t
        b = t * inv_t
        arg_a = tl.where(tl.max(a, 0) > max_a, start + tl.argmax(a, 0), arg_a)
        arg_b = tl.where(tl.max(b, 0) > max_b, start + tl.argmax(b, 0), arg_b)
        max_a, sum_a, e_a, rescale_a = _online_logsumexp(a, max_a, sum_a)
        max_b, sum_b, e_b, rescale_b = _online_logsumexp(b, max_b, sum_b)
        if DIVERGENCE == FORWARD_KL:
            kl_acc = kl_acc * rescale_b + tl.sum(tl.where(e_b == 0.0, 0.0, e_b * (b - a)), 0)
        if DIVERGENCE == REVERSE_KL:
            kl_acc = kl_acc * rescale_a + tl.sum(tl.where(e_a == 0.0, 0.0, e_a * (a - b)), 0)
        if not SAME_T:
            max_s, sum_s, _, _ = _online_logsumexp(s, max_s, sum_s)
            max_t, sum_t, _, _ = _online_logsumexp(t, max_t, sum_t)

    lsum_a = tl.log(sum_a)
    lsum_b = tl.log(sum_b)
    if SAME_T:
        max_s = max_a
        max_t = max_b
        lsum_s = lsum_a
        lsum_t = lsum_b
    else:
        lsum_s = tl.log(sum_s)
        lsum_t = tl.log(sum_t)
    # lse_a - lse_b as (max_a - max_b) + (lsum_a - lsum_b): no term is rounded at the logits' magnitude.
    if DIVERGENCE == FORWARD_KL:
        tl.store(stats_ptr + STAT_DIVERGENCE * n_rows + row, kl_acc / sum_b + (max_a - max_b) + (lsum_a - lsum_b))
    if DIVERGENCE == REVERSE_KL:
        tl.store(stats_ptr + STAT_DIVERGENCE * n_rows + row, kl_acc / sum_a + (max_b - max_a) + (lsum_b - lsum_a))
    tl.store(stats_ptr + STAT_MAX_A * n_rows + row, max_a)
    tl.store(stats_ptr + STAT_LSUM_A * n_rows + row, lsum_a)
    tl.store(stats_ptr + STAT_MAX_B * n_rows + row, max_b)
    tl.store(stats_ptr + STAT_LSUM_B * n_rows + row, lsum_b)
    tl.store(stats_ptr + STAT_MAX_S * n_rows + row, max_s)
    tl.store(stats_ptr + STAT_LSUM_S * n_rows + row, lsum_s)
    tl.store(stats_ptr + STAT_MAX_T * n_rows + row, max_t)
    tl.store(stats_ptr + STAT_LSUM_T * n_rows + row, lsum_t)
    tl.store(argmax_ptr + row, arg_a.to(tl.int64))
    tl.store(argmax_ptr + n_rows + row, arg_b.to(tl.int64))


@triton.jit
def _soft_pass_kernel(
    s_ptr,  # [N, *] student logits
    t_ptr,  # [N, *] teacher logits
    stats_ptr,  # [STATS_ROWS, N] fp32: reads the (max, lsum) at T, writes divergence and sum(q * g)
    s_stride,
    t_stride,
    n_rows,
    vocab,
    inv_t,
    mix,  # beta (jsd) or skew
    DIVERGENCE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Pass 2 (three-pass divergences only), one program per row: the loss needs log m, hence both lse."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    offs = tl.arange(0, BLOCK)
    div = tl.zeros([BLOCK], tl.float32)
    q_dot_g = tl.zeros([BLOCK], tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + offs
        mask = cols < vocab
        s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        lq = _log_probs(s * inv_t, stats_ptr, n_rows, row, STAT_MAX_A, STAT_LSUM_A)
        lp = _log_probs(t * inv_t, stats_ptr, n_rows, row, STAT_MAX_B, STAT_LSUM_B)
        term, q_g, _ = _pointwise_terms(lq, lp, mix, DIVERGENCE)
        div += tl.where(mask, term, 0.0)
        q_dot_g += tl.where(mask, q_g, 0.0)
    tl.store(stats_ptr + STAT_DIVERGENCE * n_rows + row, tl.sum(div, 0))
    tl.store(stats_ptr + STAT_Q_DOT_G * n_rows + row, tl.sum(q_dot_g, 0))


@triton.jit
def _grad_kernel(
    s_ptr,  # [N, *] student logits
    t_ptr,  # [N, *] teacher logits
    grad_s_ptr,  # [N, s_width] out: d loss / d student logits, input dtype
    grad_t_ptr,  # [N, t_width] out: d loss / d teacher logits (teacher CE only), input dtype
    stats_ptr,  # [STATS_ROWS, N] fp32 from the forward
    hard_ptr,  # [N] int64 student CE target
    label_ptr,  # [N] int64 teacher CE target
    scale_ptr,  # [N] fp32 d reduced loss / d row loss, already times grad_output; 0 on ignored rows
    s_stride,
    t_stride,
    grad_s_stride,
    grad_t_stride,
    n_rows,
    vocab,
    s_width,
    t_width,
    inv_t,
    mix,
    soft_coef,  # alpha * (T² or 1) / T
    hard_coef,  # 1 - alpha
    teacher_coef,  # teacher_ce_weight
    DIVERGENCE: tl.constexpr,
    SAME_T: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    HARD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Last pass, one program per (row, column block): writes the gradients, zero on padding columns."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < vocab
    scale = tl.load(scale_ptr + row)
    # where(), not a product: an ignored row (scale 0) must get exactly 0 even if its logits are inf.
    keep = tl.where(scale != 0.0, valid, False)
    if STUDENT_GRAD:
        s = tl.load(s_ptr + row * s_stride + cols, mask=valid, other=float("-inf")).to(tl.float32)
        t = tl.load(t_ptr + row * t_stride + cols, mask=valid, other=float("-inf")).to(tl.float32)
        lq = _log_probs(s * inv_t, stats_ptr, n_rows, row, STAT_MAX_A, STAT_LSUM_A)
        lp = _log_probs(t * inv_t, stats_ptr, n_rows, row, STAT_MAX_B, STAT_LSUM_B)
        div = tl.load(stats_ptr + STAT_DIVERGENCE * n_rows + row)
        if DIVERGENCE == FORWARD_KL:
            q = tl.exp(lq)
            d_soft = q - tl.exp(lp)
        elif DIVERGENCE == REVERSE_KL:
            q = tl.exp(lq)
            d_soft = tl.where(q == 0.0, 0.0, q * (lq - lp - div))
        else:
            _, q_g, q = _pointwise_terms(lq, lp, mix, DIVERGENCE)
            d_soft = q_g - q * tl.load(stats_ptr + STAT_Q_DOT_G * n_rows + row)
        # A row whose divergence is +inf gets NaN in every column, as on the PyTorch backend: the derivative
        # of an infinite loss has no value (the closed forms give a mix of ±inf, NaN and finite entries).
        d_soft = tl.where(div == float("inf"), float("nan"), d_soft)
        grad = soft_coef * d_soft
        if HARD:
            target = tl.load(hard_ptr + row)
            if SAME_T:
                q1 = q
            else:
                q1 = tl.exp(_log_probs(s, stats_ptr, n_rows, row, STAT_MAX_S, STAT_LSUM_S))
            grad += hard_coef * (q1 - tl.where(cols == target, 1.0, 0.0))
        grad = tl.where(keep, grad * scale, 0.0)
        tl.store(grad_s_ptr + row * grad_s_stride + cols, grad.to(grad_s_ptr.dtype.element_ty), mask=cols < s_width)
    if TEACHER_GRAD:
        t = tl.load(t_ptr + row * t_stride + cols, mask=valid, other=float("-inf")).to(tl.float32)
        p1 = tl.exp(_log_probs(t, stats_ptr, n_rows, row, STAT_MAX_T, STAT_LSUM_T))
        target = tl.load(label_ptr + row)
        grad_t = teacher_coef * (p1 - tl.where(cols == target, 1.0, 0.0))
        grad_t = tl.where(keep, grad_t * scale, 0.0)
        tl.store(
            grad_t_ptr + row * grad_t_stride + cols,
            grad_t.to(grad_t_ptr.dtype.element_ty),
            mask=cols < t_width,
        )


#: True when the kernels were defined under ``TRITON_INTERPRET=1`` (they then run on CPU tensors).
INTERPRETED = isinstance(_row_stats_kernel, InterpretedFunction)


def launch_config(vocab: int) -> dict[str, int]:
    """Block sizes and warps from the vocabulary size.

    The row passes stream 4096-column blocks of both rows (16 KB of bf16 in flight per program, enough to
    keep an H100/H200 SM's memory pipe busy with two programs per SM) on 8 warps; the gradient pass uses
    a 2-D grid of 1024-column blocks so that even a few rows fill the GPU.
    """
    row_block = min(4096, triton.next_power_of_2(vocab))
    grad_block = min(1024, triton.next_power_of_2(vocab))
    return {
        "row_block": row_block,
        "row_warps": 8 if row_block >= 2048 else 4,
        "grad_block": grad_block,
        "grad_warps": 4,
    }


def triton_distillation_loss(inputs: FlatInputs, opts: LossOptions) -> DistillationOutput:
    """Distillation loss on flattened inputs with the Triton kernels (CUDA tensors, or CPU under the interpreter)."""
    student, teacher = inputs.student, inputs.teacher
    want_student_grad = torch.is_grad_enabled() and student.requires_grad
    want_teacher_grad = torch.is_grad_enabled() and teacher.requires_grad and opts.teacher_ce_weight > 0
    out = TritonDistillationFunction.apply(
        student, teacher, inputs.labels, opts, inputs.vocab_size, want_student_grad, want_teacher_grad
    )
    return DistillationOutput(*out)


def row_statistics(
    student: torch.Tensor, teacher: torch.Tensor, vocab: int, opts: LossOptions
) -> tuple[torch.Tensor, RowStatistics]:
    """Forward passes over ``[N, *]`` logits.

    Returns the fp32 statistics buffer ``[STATS_ROWS, N]`` (the gradient pass reads it again) and the
    :class:`RowStatistics` views of it and of the int64 argmax buffer ``[2, N]``.
    """
    n = student.shape[0]
    stats = torch.empty(STATS_ROWS, n, dtype=torch.float32, device=student.device)
    argmax = torch.empty(2, n, dtype=torch.long, device=student.device)
    rows = StatRows(*stats.unbind(0))
    student_argmax, teacher_argmax = argmax.unbind(0)
    view = RowStatistics(
        rows.divergence, rows.max_s, rows.lsum_s, rows.max_t, rows.lsum_t, student_argmax, teacher_argmax
    )
    if n == 0:
        return stats, view
    cfg = launch_config(vocab)
    inv_t = 1.0 / opts.temperature
    code = opts.divergence_code
    _row_stats_kernel[(n,)](
        student,
        teacher,
        stats,
        argmax,
        student.stride(0),
        teacher.stride(0),
        n,
        vocab,
        inv_t,
        DIVERGENCE=code,
        SAME_T=opts.temperature == 1.0,
        BLOCK=cfg["row_block"],
        num_warps=cfg["row_warps"],
    )
    if opts.resolved_divergence not in ONLINE_DIVERGENCES:
        _soft_pass_kernel[(n,)](
            student,
            teacher,
            stats,
            student.stride(0),
            teacher.stride(0),
            n,
            vocab,
            inv_t,
            opts.mix,
            DIVERGENCE=code,
            BLOCK=cfg["row_block"],
            num_warps=cfg["row_warps"],
        )
    return stats, view


def write_gradients(student, teacher, grad_s, grad_t, stats, hard, label, scale, vocab: int, opts: LossOptions):
    """Gradient pass: write row-loss gradients times ``scale`` ``[N]`` into ``grad_s`` / ``grad_t`` (or None).

    The gradient buffers may be the logits themselves: each program reads its tile before writing it.
    ``hard`` and ``label`` are ``[N]`` int64 targets (read only when alpha < 1 / for ``grad_t``).
    """
    n = student.shape[0]
    if n == 0 or (grad_s is None and grad_t is None):
        return
    cfg = launch_config(vocab)
    width = max(student.shape[1], teacher.shape[1])
    grid = (n, triton.cdiv(width, cfg["grad_block"]))
    # Placeholders keep the signature fixed; constexpr flags compile the unused paths away.
    gs = grad_s if grad_s is not None else student
    gt = grad_t if grad_t is not None else teacher
    _grad_kernel[grid](
        student,
        teacher,
        gs,
        gt,
        stats,
        hard,
        label,
        scale,
        student.stride(0),
        teacher.stride(0),
        gs.stride(0),
        gt.stride(0),
        n,
        vocab,
        student.shape[1],
        teacher.shape[1],
        1.0 / opts.temperature,
        opts.mix,
        opts.alpha * opts.soft_scale / opts.temperature,
        1.0 - opts.alpha,
        opts.teacher_ce_weight,
        DIVERGENCE=opts.divergence_code,
        SAME_T=opts.temperature == 1.0,
        STUDENT_GRAD=grad_s is not None,
        HARD=opts.alpha < 1.0,
        TEACHER_GRAD=grad_t is not None,
        BLOCK=cfg["grad_block"],
        num_warps=cfg["grad_warps"],
    )


def fused_linear_chunk(logits_s, logits_t, labels, pre, scale, opts, vocab, student_grad, teacher_grad):
    """One token chunk of ``fused_linear_distillation_loss``: row statistics of ``[R, *]`` logits and, where
    wanted, the row-loss gradients times ``scale`` ``[R]``, written over the logits themselves.

    Returns ``(rows, targets, student target logit, teacher target logit), (grad_s, grad_t)``, the
    contract ``torch_backend.fused_linear_chunk`` shares (``pre``, the label targets, is not needed here).
    """
    stats, rows = row_statistics(logits_s, logits_t, vocab, opts)
    targets = row_targets(labels, rows.teacher_argmax, opts, logits_s.shape[0], logits_s.device)
    s_y, t_y = gather_target_logits(logits_s, logits_t, targets, torch.float32)  # before the in-place gradient
    grad_s = logits_s if student_grad else None
    grad_t = logits_t if teacher_grad else None
    if student_grad or teacher_grad:
        hard = targets.hard if targets.hard is not None else rows.teacher_argmax
        label = targets.teacher if targets.teacher is not None else rows.teacher_argmax
        write_gradients(logits_s, logits_t, grad_s, grad_t, stats, hard, label, scale.float().contiguous(), vocab, opts)
    return (rows, targets, s_y, t_y), (grad_s, grad_t)


class TritonDistillationFunction(torch.autograd.Function):
    """Distillation loss on ``[N, V]`` logits with the fused kernels.

    Per row, with a = s/T, b = t/T, q = softmax(a), p = softmax(b) over the valid columns:
    ``loss = alpha * c * D(p, q) + (1 - alpha) * CE(s, y) + w * CE(t, labels)``, c = T² if t2_scaling else 1,
    y = labels or argmax(t), CE at T=1. Gradients:
    ``d/ds = alpha * c / T * dD/da + (1 - alpha) * (softmax(s) - onehot(y))`` with
    dD/da = q - p (forward KL), q * (log q - log p - D) (reverse KL), and q * (g - sum(q * g)) for the
    others, g = dD/dq with q unconstrained; ``d/dt = w * (softmax(t) - onehot(labels))`` (the soft term
    treats the teacher as a constant).
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, opts: LossOptions, vocab: int, want_student_grad, want_teacher_grad):
        n = student.shape[0]
        stats, rows = row_statistics(student, teacher, vocab, opts)
        targets = row_targets(labels, rows.teacher_argmax, opts, n, student.device)
        target_logits = gather_target_logits(student, teacher, targets, torch.float32)
        output, divisor = finish_rows(rows, targets, *target_logits, opts)
        hard = targets.hard if targets.hard is not None else rows.teacher_argmax  # unused unless alpha < 1
        label = targets.teacher if targets.teacher is not None else rows.teacher_argmax  # unused unless w > 0
        ctx.save_for_backward(student, teacher, stats, targets.counted, hard, label, divisor)
        ctx.opts, ctx.vocab = opts, vocab
        ctx.wants = (want_student_grad, want_teacher_grad)
        ctx.mark_non_differentiable(*output[1:])
        return tuple(output)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        student, teacher, stats, counted, hard, label, divisor = ctx.saved_tensors
        opts, vocab = ctx.opts, ctx.vocab
        want_student_grad = ctx.wants[0] and ctx.needs_input_grad[0]
        want_teacher_grad = ctx.wants[1] and ctx.needs_input_grad[1]
        scale = row_grad_scale(grad_loss, counted, divisor, opts.reduction).float().contiguous()
        grad_s = torch.empty_like(student) if want_student_grad else None
        grad_t = torch.empty_like(teacher) if want_teacher_grad else None
        write_gradients(student, teacher, grad_s, grad_t, stats, hard, label, scale, vocab, opts)
        return grad_s, grad_t, None, None, None, None, None
