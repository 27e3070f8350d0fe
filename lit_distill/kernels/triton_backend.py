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

    Each log-sum-exp is kept as the raw logits' max and a log sum exp of the max-shifted logits: their sum
    would be rounded at the logits' magnitude (an fp32 ulp is 6e-5 at 1e3), more than a confident token's
    whole cross-entropy. One max serves every temperature, since max(x / T) = max(x) / T for T > 0.
    """

    divergence: torch.Tensor  # D at temperature T
    max_s: torch.Tensor  # max(s)
    lsum_a: torch.Tensor  # log sum exp((s - max_s) / T)
    max_t: torch.Tensor  # max(t)
    lsum_b: torch.Tensor  # log sum exp((t - max_t) / T)
    lsum_s: torch.Tensor  # log sum exp(s - max_s); NaN when no term needs it
    lsum_t: torch.Tensor  # log sum exp(t - max_t); likewise
    q_dot_g: torch.Tensor  # sum(q * dD/dq), three-pass divergences only


STATS_ROWS = len(StatRows._fields)
# The kernels' indices of the same rows, by name.
STAT_DIVERGENCE = tl.constexpr(StatRows._fields.index("divergence"))
STAT_MAX_S = tl.constexpr(StatRows._fields.index("max_s"))
STAT_LSUM_A = tl.constexpr(StatRows._fields.index("lsum_a"))
STAT_MAX_T = tl.constexpr(StatRows._fields.index("max_t"))
STAT_LSUM_B = tl.constexpr(StatRows._fields.index("lsum_b"))
STAT_LSUM_S = tl.constexpr(StatRows._fields.index("lsum_s"))
STAT_LSUM_T = tl.constexpr(StatRows._fields.index("lsum_t"))
STAT_Q_DOT_G = tl.constexpr(StatRows._fields.index("q_dot_g"))

# The kernels work in log2 units: exp2 is one instruction, exp a multiply, exp2 and a denormal fix-up.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _load_block(row_ptr, cols, width, vocab):
    """One block of a logit row in fp32, -inf at padding columns.

    The load is masked on the row's width (the JIT proves it a multiple of 16 for usual heads, so loads stay
    128-bit), and the vocabulary only after it: a mask on an odd vocabulary (50257) would make every load 16-bit.
    """
    x = tl.load(row_ptr + cols, mask=cols < width, other=float("-inf")).to(tl.float32)
    return tl.where(cols < vocab, x, float("-inf"))


@triton.jit
def _shift(row_max):
    """The exponent shift of a row: its max, or 0 while the row is all -inf (no -inf - -inf = NaN)."""
    return tl.where(row_max == float("-inf"), 0.0, row_max)


@triton.jit
def _row_scalar(stats_ptr, n_rows, row, STAT: tl.constexpr):
    return tl.load(stats_ptr + STAT * n_rows + row)


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
def _fold_block(
    s, t, start, max_s, max_t, sum_a, sum_b, sum_s, sum_t, kl_acc, arg_s, arg_t, c,
    DIVERGENCE: tl.constexpr, STUDENT_T1: tl.constexpr, TEACHER_T1: tl.constexpr,
):  # fmt: skip
    """Fold one block of both rows (fp32, -inf at padding) into the running statistics of the row."""
    block_max_s = tl.max(s, 0)
    block_max_t = tl.max(t, 0)
    # The argmax only when a block raises the running max (a few times per row): a block-uniform branch.
    # Strictly greater, so the first maximum wins, as in torch.argmax.
    if block_max_s > max_s:
        arg_s = start + tl.argmax(s, 0)
    if block_max_t > max_t:
        arg_t = start + tl.argmax(t, 0)
    shift_s = _shift(tl.maximum(max_s, block_max_s))
    shift_t = _shift(tl.maximum(max_t, block_max_t))
    ds = s - shift_s
    dt = t - shift_t
    # The old sums' factor: 2^((old max - shift) c), 0 while the old max is -inf.
    rescale_a = tl.exp2((max_s - shift_s) * c)
    rescale_b = tl.exp2((max_t - shift_t) * c)
    e_a = tl.exp2(ds * c)
    e_b = tl.exp2(dt * c)
    sum_a = sum_a * rescale_a + tl.sum(e_a, 0)
    sum_b = sum_b * rescale_b + tl.sum(e_b, 0)
    if DIVERGENCE == FORWARD_KL:
        kl_acc = kl_acc * rescale_b + tl.sum(tl.where(e_b == 0.0, 0.0, e_b * (t - s)), 0)
    if DIVERGENCE == REVERSE_KL:
        kl_acc = kl_acc * rescale_a + tl.sum(tl.where(e_a == 0.0, 0.0, e_a * (s - t)), 0)
    if STUDENT_T1:
        sum_s = sum_s * tl.exp2((max_s - shift_s) * LOG2E) + tl.sum(tl.exp2(ds * LOG2E), 0)
    if TEACHER_T1:
        sum_t = sum_t * tl.exp2((max_t - shift_t) * LOG2E) + tl.sum(tl.exp2(dt * LOG2E), 0)
    max_s = tl.maximum(max_s, block_max_s)
    max_t = tl.maximum(max_t, block_max_t)
    return max_s, max_t, sum_a, sum_b, sum_s, sum_t, kl_acc, arg_s, arg_t


@triton.jit
def _row_stats_kernel(
    s_ptr,  # [N, s_width] student logits, row stride s_stride, unit column stride
    t_ptr,  # [N, t_width] teacher logits, row stride t_stride
    stats_ptr,  # [STATS_ROWS, N] fp32 out (StatRows): the online divergences, maxes and log sums
    argmax_ptr,  # [2, N] int64 out: student argmax, teacher argmax
    s_stride,
    t_stride,
    s_width,
    t_width,
    n_rows,
    vocab,  # valid columns; those at or past it are padding
    inv_t,
    DIVERGENCE: tl.constexpr,
    SAME_T: tl.constexpr,  # T == 1: the T=1 log sums are the tempered ones
    STUDENT_T1: tl.constexpr,  # T != 1 and a term needs the student's log sum at T=1
    TEACHER_T1: tl.constexpr,  # likewise the teacher's
    BLOCK: tl.constexpr,
):
    """Pass 1, one program per row: online log-sum-exps of both rows, argmaxes, online forward / reverse KL.

    Exponents are (x - max) * log2(e) / T: the subtraction is exact near the max, so the logits' magnitude
    never rounds a log-probability (scaling first would, by 6e-5 at 1e3). Whole blocks are loaded without
    a mask; only the last, partial block is masked.
    """
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    t_row = t_ptr + row * t_stride
    offs = tl.arange(0, BLOCK)
    c = inv_t * LOG2E
    max_s = tl.full([], float("-inf"), tl.float32)
    max_t = tl.full([], float("-inf"), tl.float32)
    sum_a = tl.zeros([], tl.float32)  # sum 2^((s - shift) c), shift the running max
    sum_b = tl.zeros([], tl.float32)
    sum_s = tl.zeros([], tl.float32)  # the same at T=1
    sum_t = tl.zeros([], tl.float32)
    kl_acc = tl.zeros([], tl.float32)  # forward: sum e_b (t - s); reverse: sum e_a (s - t)
    arg_s = tl.zeros([], tl.int32)
    arg_t = tl.zeros([], tl.int32)
    whole = vocab - vocab % BLOCK
    for start in range(0, whole, BLOCK):
        s = tl.load(s_row + start + offs).to(tl.float32)
        t = tl.load(t_row + start + offs).to(tl.float32)
        max_s, max_t, sum_a, sum_b, sum_s, sum_t, kl_acc, arg_s, arg_t = _fold_block(
            s, t, start, max_s, max_t, sum_a, sum_b, sum_s, sum_t, kl_acc, arg_s, arg_t, c,
            DIVERGENCE, STUDENT_T1, TEACHER_T1,
        )  # fmt: skip
    if whole < vocab:
        s = _load_block(s_row, whole + offs, s_width, vocab)
        t = _load_block(t_row, whole + offs, t_width, vocab)
        max_s, max_t, sum_a, sum_b, sum_s, sum_t, kl_acc, arg_s, arg_t = _fold_block(
            s, t, whole, max_s, max_t, sum_a, sum_b, sum_s, sum_t, kl_acc, arg_s, arg_t, c,
            DIVERGENCE, STUDENT_T1, TEACHER_T1,
        )  # fmt: skip

    lsum_a = tl.log2(sum_a) * LN2
    lsum_b = tl.log2(sum_b) * LN2
    # lse_a - lse_b as (max_s - max_t) / T + (lsum_a - lsum_b): no term is rounded at the logits' magnitude.
    if DIVERGENCE == FORWARD_KL:
        div = kl_acc / sum_b * inv_t - ((max_t - max_s) * inv_t + (lsum_b - lsum_a))
        tl.store(stats_ptr + STAT_DIVERGENCE * n_rows + row, div)
    if DIVERGENCE == REVERSE_KL:
        div = kl_acc / sum_a * inv_t - ((max_s - max_t) * inv_t + (lsum_a - lsum_b))
        tl.store(stats_ptr + STAT_DIVERGENCE * n_rows + row, div)
    # At T = 1 the T=1 sums are the tempered ones; otherwise NaN unless a term asked for them.
    if SAME_T:
        lsum_s = lsum_a
        lsum_t = lsum_b
    else:
        lsum_s = tl.full([], float("nan"), tl.float32)
        lsum_t = tl.full([], float("nan"), tl.float32)
    if STUDENT_T1:
        lsum_s = tl.log2(sum_s) * LN2
    if TEACHER_T1:
        lsum_t = tl.log2(sum_t) * LN2
    tl.store(stats_ptr + STAT_MAX_S * n_rows + row, max_s)
    tl.store(stats_ptr + STAT_LSUM_A * n_rows + row, lsum_a)
    tl.store(stats_ptr + STAT_MAX_T * n_rows + row, max_t)
    tl.store(stats_ptr + STAT_LSUM_B * n_rows + row, lsum_b)
    tl.store(stats_ptr + STAT_LSUM_S * n_rows + row, lsum_s)
    tl.store(stats_ptr + STAT_LSUM_T * n_rows + row, lsum_t)
    tl.store(argmax_ptr + row, arg_s.to(tl.int64))
    tl.store(argmax_ptr + n_rows + row, arg_t.to(tl.int64))


@triton.jit
def _soft_block(s, t, shift_s, shift_t, lsum_a, lsum_b, inv_t, mix, DIVERGENCE: tl.constexpr):
    """A block's sums of the divergence terms and of q * g (fp32 logits, -inf at padding)."""
    term, q_g, _ = _pointwise_terms((s - shift_s) * inv_t - lsum_a, (t - shift_t) * inv_t - lsum_b, mix, DIVERGENCE)
    return tl.sum(term, 0), tl.sum(q_g, 0)


@triton.jit
def _soft_pass_kernel(
    s_ptr,  # [N, s_width] student logits
    t_ptr,  # [N, t_width] teacher logits
    stats_ptr,  # [STATS_ROWS, N] fp32: reads the maxes and log sums at T, writes divergence and sum(q * g)
    s_stride,
    t_stride,
    s_width,
    t_width,
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
    shift_s = _shift(_row_scalar(stats_ptr, n_rows, row, STAT_MAX_S))
    shift_t = _shift(_row_scalar(stats_ptr, n_rows, row, STAT_MAX_T))
    lsum_a = _row_scalar(stats_ptr, n_rows, row, STAT_LSUM_A)
    lsum_b = _row_scalar(stats_ptr, n_rows, row, STAT_LSUM_B)
    offs = tl.arange(0, BLOCK)
    # Scalar running sums: [BLOCK] accumulators would hold 2 x 16 registers per thread across the loop.
    div = tl.zeros([], tl.float32)
    q_dot_g = tl.zeros([], tl.float32)
    whole = vocab - vocab % BLOCK
    for start in range(0, whole, BLOCK):
        s = tl.load(s_row + start + offs).to(tl.float32)
        t = tl.load(t_row + start + offs).to(tl.float32)
        block_div, block_q_dot_g = _soft_block(s, t, shift_s, shift_t, lsum_a, lsum_b, inv_t, mix, DIVERGENCE)
        div += block_div
        q_dot_g += block_q_dot_g
    if whole < vocab:  # the partial last block: its padding columns have q = p = 0, so terms of exactly 0
        s = _load_block(s_row, whole + offs, s_width, vocab)
        t = _load_block(t_row, whole + offs, t_width, vocab)
        block_div, block_q_dot_g = _soft_block(s, t, shift_s, shift_t, lsum_a, lsum_b, inv_t, mix, DIVERGENCE)
        div += block_div
        q_dot_g += block_q_dot_g
    tl.store(stats_ptr + STAT_DIVERGENCE * n_rows + row, div)
    tl.store(stats_ptr + STAT_Q_DOT_G * n_rows + row, q_dot_g)


@triton.jit
def _grad_kernel(
    s_ptr,  # [N, s_width] student logits
    t_ptr,  # [N, t_width] teacher logits
    grad_s_ptr,  # [N, s_width] out: d loss / d student logits, its own dtype
    grad_t_ptr,  # [N, t_width] out: d loss / d teacher logits (teacher CE only), its own dtype
    stats_ptr,  # [STATS_ROWS, N] fp32 from the forward
    hard_ptr,  # [N] int64 student CE target
    label_ptr,  # [N] int64 teacher CE target (the labels); also the student's second target with LABEL_MIX
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
    label_mix,  # the labels' share of the student's one-hot (label_weight), read with LABEL_MIX
    DIVERGENCE: tl.constexpr,
    SAME_T: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    SOFT: tl.constexpr,  # alpha > 0: with alpha = 0 the soft term is no part of the loss, not even an inf
    HARD: tl.constexpr,
    LABEL_MIX: tl.constexpr,  # 0 < label_weight < 1: the hard one-hot is split between argmax and label
    TEACHER_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Last pass, one program per (row, column block): writes the gradients, zero on padding columns.

    Log-probabilities in log2 units, from the forward's (max, log sum) pairs: (x - max) c - log2 sum.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    scale = tl.load(scale_ptr + row)
    # where(), not a product: an ignored row (scale 0) must get exactly 0 even if its logits are inf.
    keep = tl.where(scale != 0.0, cols < vocab, False)
    c = inv_t * LOG2E
    if STUDENT_GRAD:
        s = _load_block(s_ptr + row * s_stride, cols, s_width, vocab)
        ds = s - _shift(_row_scalar(stats_ptr, n_rows, row, STAT_MAX_S))
        lq2 = ds * c - _row_scalar(stats_ptr, n_rows, row, STAT_LSUM_A) * LOG2E
        q = tl.exp2(lq2)
        grad = tl.zeros([BLOCK], tl.float32)
        if SOFT:
            t = _load_block(t_ptr + row * t_stride, cols, t_width, vocab)
            dt = t - _shift(_row_scalar(stats_ptr, n_rows, row, STAT_MAX_T))
            lp2 = dt * c - _row_scalar(stats_ptr, n_rows, row, STAT_LSUM_B) * LOG2E
            div = _row_scalar(stats_ptr, n_rows, row, STAT_DIVERGENCE)
            if DIVERGENCE == FORWARD_KL:
                d_soft = q - tl.exp2(lp2)
            elif DIVERGENCE == REVERSE_KL:
                d_soft = tl.where(q == 0.0, 0.0, q * ((lq2 - lp2) * LN2 - div))
            else:
                _, q_g, _ = _pointwise_terms(lq2 * LN2, lp2 * LN2, mix, DIVERGENCE)
                d_soft = q_g - q * _row_scalar(stats_ptr, n_rows, row, STAT_Q_DOT_G)
            # A row whose divergence is +inf gets NaN in every column, as on the PyTorch backend: the
            # derivative of an infinite loss has no value (the closed forms give a mix of ±inf, NaN, finite).
            grad = soft_coef * tl.where(div == float("inf"), float("nan"), d_soft)
        if HARD:
            target = tl.load(hard_ptr + row)
            if SAME_T:
                q1 = q
            else:
                q1 = tl.exp2(ds * LOG2E - _row_scalar(stats_ptr, n_rows, row, STAT_LSUM_S) * LOG2E)
            onehot = tl.where(cols == target, 1.0, 0.0)
            if LABEL_MIX:  # (1 - m) CE(argmax) + m CE(labels): one softmax, the one-hot split between them
                onehot = (1.0 - label_mix) * onehot + tl.where(cols == tl.load(label_ptr + row), label_mix, 0.0)
            grad += hard_coef * (q1 - onehot)
        grad = tl.where(keep, grad * scale, 0.0)
        tl.store(grad_s_ptr + row * grad_s_stride + cols, grad.to(grad_s_ptr.dtype.element_ty), mask=cols < s_width)
    if TEACHER_GRAD:
        t1 = _load_block(t_ptr + row * t_stride, cols, t_width, vocab)
        dt1 = t1 - _shift(_row_scalar(stats_ptr, n_rows, row, STAT_MAX_T))
        p1 = tl.exp2(dt1 * LOG2E - _row_scalar(stats_ptr, n_rows, row, STAT_LSUM_T) * LOG2E)
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


def launch_config(vocab: int) -> dict[str, int | None]:
    """Block sizes, warps and register caps from the vocabulary size.

    The statistics pass streams 4096-column blocks of both rows (16 KB of bf16 in flight per program) on
    8 warps, capped at 64 registers so that four programs fit on an SM (uncapped, the rarely taken argmax
    branch would cost 16 more and one program per SM; capped, nothing spills: ``tests/compile_kernels.py``).
    The second pass of the three-pass divergences is arithmetic-heavy, so it takes half the columns per
    thread. The gradient pass uses a 2-D grid of 1024-column blocks so that even a few rows fill the GPU.
    ``python3 -m bench.sweep`` on a GPU times the alternatives.
    """
    row_block = min(4096, triton.next_power_of_2(vocab))
    soft_block = min(2048, row_block)
    grad_block = min(1024, triton.next_power_of_2(vocab))
    row_warps = 8 if row_block >= 2048 else 4
    return {
        "row_block": row_block,
        "row_warps": row_warps,
        "row_registers": 64 if row_block // (32 * row_warps) <= 16 else None,
        "soft_block": soft_block,
        "soft_warps": 8 if soft_block >= 2048 else 4,
        "grad_block": grad_block,
        "grad_warps": 4,
    }


def _register_cap(registers: int | None) -> dict[str, int]:
    """The launch keyword that caps a kernel's registers (none when uncapped)."""
    return {} if registers is None else {"maxnreg": registers}


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
    student: torch.Tensor,
    teacher: torch.Tensor,
    vocab: int,
    opts: LossOptions,
    *,
    cross_entropies: tuple[bool, bool] = (True, True),
) -> tuple[torch.Tensor, RowStatistics]:
    """Forward passes over ``[N, *]`` logits.

    ``cross_entropies`` says whether the student's / the teacher's cross-entropy at T=1 will be read: at
    T != 1 each costs another exponential per logit, so without it its log sum is NaN.

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
    same_t = opts.temperature == 1.0
    widths = (student.stride(0), teacher.stride(0), student.shape[1], teacher.shape[1], n, vocab)
    _row_stats_kernel[(n,)](
        student,
        teacher,
        stats,
        argmax,
        *widths,
        inv_t,
        DIVERGENCE=code,
        SAME_T=same_t,
        STUDENT_T1=not same_t and cross_entropies[0],
        TEACHER_T1=not same_t and cross_entropies[1],
        BLOCK=cfg["row_block"],
        num_warps=cfg["row_warps"],
        **_register_cap(cfg.get("row_registers")),
    )
    if opts.resolved_divergence not in ONLINE_DIVERGENCES:
        _soft_pass_kernel[(n,)](
            student,
            teacher,
            stats,
            *widths,
            inv_t,
            opts.mix,
            DIVERGENCE=code,
            BLOCK=cfg.get("soft_block", cfg["row_block"]),
            num_warps=cfg.get("soft_warps", cfg["row_warps"]),
        )
    return stats, view


def write_gradients(student, teacher, grad_s, grad_t, stats, hard, label, scale, vocab: int, opts: LossOptions):
    """Gradient pass: write row-loss gradients times ``scale`` ``[N]`` into ``grad_s`` / ``grad_t`` (or None).

    The gradient buffers may be the logits themselves: each program reads its tile before writing it.
    ``hard`` and ``label`` are ``[N]`` int64 targets (read only when alpha < 1 / for ``grad_t`` or the
    label_weight mix).
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
        opts.label_mix,
        DIVERGENCE=opts.divergence_code,
        SAME_T=opts.temperature == 1.0,
        STUDENT_GRAD=grad_s is not None,
        SOFT=opts.alpha > 0.0,
        HARD=opts.alpha < 1.0,
        LABEL_MIX=opts.alpha < 1.0 and opts.label_mix > 0.0,
        TEACHER_GRAD=grad_t is not None,
        BLOCK=cfg["grad_block"],
        num_warps=cfg["grad_warps"],
    )


def fused_linear_chunk(logits_s, logits_t, labels, pre, scale, opts, vocab, student_grad, teacher_grad):
    """One token chunk of ``fused_linear_distillation_loss``: row statistics of ``[R, *]`` logits and, where
    wanted, the row-loss gradients times ``scale`` ``[R]``.

    ``student_grad`` / ``teacher_grad``: falsy for no gradient, else True or the dtype to write it in. In the
    logits' dtype it is written over the logits; in another (the bf16 of the matmuls, from fp32 logits) the
    gradient pass writes it into a new buffer as it reads the logits: scale and cast in one pass.
    Returns ``(rows, targets, TargetLogits), (grad_s, grad_t)``, the contract
    ``torch_backend.fused_linear_chunk`` shares (it writes the logits' dtype whatever dtype it is given;
    ``pre``, the label targets, is not needed here).
    """
    stats, rows = row_statistics(logits_s, logits_t, vocab, opts)
    targets = row_targets(labels, rows.teacher_argmax, opts, logits_s.shape[0], logits_s.device)
    target_logits = gather_target_logits(logits_s, logits_t, targets, torch.float32)  # before an in-place gradient
    grad_s, grad_t = (
        None if not want else x if want is True or want == x.dtype else torch.empty_like(x, dtype=want)
        for x, want in ((logits_s, student_grad), (logits_t, teacher_grad))
    )
    if grad_s is not None or grad_t is not None:
        hard = targets.hard if targets.hard is not None else rows.teacher_argmax
        label = targets.teacher if targets.teacher is not None else rows.teacher_argmax
        write_gradients(logits_s, logits_t, grad_s, grad_t, stats, hard, label, scale.float().contiguous(), vocab, opts)
    return (rows, targets, target_logits), (grad_s, grad_t)


class TritonDistillationFunction(torch.autograd.Function):
    """Distillation loss on ``[N, V]`` logits with the fused kernels.

    Per row, with a = s/T, b = t/T, q = softmax(a), p = softmax(b) over the valid columns:
    ``loss = alpha * c * D(p, q) + (1 - alpha) * CE(s, y) + w * CE(t, labels)``, c = T² if t2_scaling else 1,
    y = labels or argmax(t), CE at T=1 (with label_weight m mixing the labels into an argmax hard term,
    ``(1 - m) CE(s, argmax(t)) + m CE(s, labels)``, whose onehot(y) below is split the same way). Gradients:
    ``d/ds = alpha * c / T * dD/da + (1 - alpha) * (softmax(s) - onehot(y))`` with
    dD/da = q - p (forward KL), q * (log q - log p - D) (reverse KL), and q * (g - sum(q * g)) for the
    others, g = dD/dq with q unconstrained; ``d/dt = w * (softmax(t) - onehot(labels))`` (the soft term
    treats the teacher as a constant).
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, opts: LossOptions, vocab: int, want_student_grad, want_teacher_grad):
        n = student.shape[0]
        has_labels = labels is not None
        student_ce = has_labels or opts.hard_labels == "teacher_argmax"
        stats, rows = row_statistics(student, teacher, vocab, opts, cross_entropies=(student_ce, has_labels))
        targets = row_targets(labels, rows.teacher_argmax, opts, n, student.device)
        logits = gather_target_logits(student, teacher, targets, torch.float32)
        output, divisor = finish_rows(rows, targets, logits.student, logits.teacher, opts, logits.student_label)
        hard = targets.hard if targets.hard is not None else rows.teacher_argmax  # unused unless alpha < 1
        # unused unless w > 0 or the label_weight mix
        label = targets.teacher if targets.teacher is not None else rows.teacher_argmax
        ctx.save_for_backward(student, teacher, stats, targets.counted, hard, label, divisor)
        ctx.opts, ctx.vocab = opts, vocab
        ctx.wants = (want_student_grad, want_teacher_grad)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics outputs
        return tuple(output)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        student, teacher, stats, counted, hard, label, divisor = ctx.saved_tensors
        opts, vocab = ctx.opts, ctx.vocab
        want_student_grad = ctx.wants[0] and ctx.needs_input_grad[0] and grad_loss is not None
        want_teacher_grad = ctx.wants[1] and ctx.needs_input_grad[1] and grad_loss is not None
        if not (want_student_grad or want_teacher_grad):
            return None, None, None, None, None, None, None
        scale = row_grad_scale(grad_loss, counted, divisor, opts.reduction).float().contiguous()
        grad_s = torch.empty_like(student) if want_student_grad else None
        grad_t = torch.empty_like(teacher) if want_teacher_grad else None
        write_gradients(student, teacher, grad_s, grad_t, stats, hard, label, scale, vocab, opts)
        return grad_s, grad_t, None, None, None, None, None
