"""Chunked pure-PyTorch distillation loss: the CPU path, and the Triton kernels' oracle at scale.

The rows are processed a chunk at a time, so the peak extra memory is a few ``[chunk, V]`` temporaries
instead of the several full ``[N, V]`` fp32 tensors that ``log_softmax`` + ``kl_div`` + autograd keep.
On a CPU the gradient must be materialized anyway and recomputing the softmaxes in the backward would
double the exponentials, so when a gradient is wanted it is computed in the forward, chunk by chunk, and
the backward only rescales it by ``grad_output``.
"""

from __future__ import annotations

import torch

from .common import (
    DistillationOutput,
    FlatInputs,
    LossOptions,
    RowStatistics,
    RowTargets,
    finish_rows,
    row_grad_scale,
    row_targets,
)

#: Elements per ``[chunk, V]`` temporary (4 MiB in fp32); about eight such temporaries live at once.
DEFAULT_CHUNK_ELEMENTS = 1 << 20


def reference_distillation_loss(
    inputs: FlatInputs, opts: LossOptions, *, chunk_rows: int | None = None
) -> DistillationOutput:
    """Distillation loss on flattened inputs with the chunked PyTorch implementation.

    Args:
        inputs: logits ``[N, V_s]`` and ``[N, V_t]``, labels ``[N]`` or None (see ``flatten_inputs``).
        opts: validated options.
        chunk_rows: rows per chunk; by default as many as fit ``DEFAULT_CHUNK_ELEMENTS``.
    """
    vocab = inputs.vocab_size
    if chunk_rows is None:
        chunk_rows = max(1, DEFAULT_CHUNK_ELEMENTS // vocab)
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    student, teacher = inputs.student, inputs.teacher
    want_student_grad = torch.is_grad_enabled() and student.requires_grad
    # The soft term treats the teacher as a constant; only teacher CE reaches the teacher's logits.
    want_teacher_grad = torch.is_grad_enabled() and teacher.requires_grad and opts.teacher_ce_weight > 0
    out = _ChunkedDistillation.apply(
        student, teacher, inputs.labels, opts, vocab, chunk_rows, want_student_grad, want_teacher_grad
    )
    return DistillationOutput(*out)


class _ChunkedDistillation(torch.autograd.Function):
    """Row-chunked forward that also writes the gradient of each row's loss; backward rescales it.

    Per row, with a = s/T, b = t/T, q = softmax(a), p = softmax(b) over the valid columns:
    loss = alpha * c * D(p, q) + (1 - alpha) * CE(s, y) + w * CE(t, labels), c = T² if t2_scaling else 1.
    d loss/ds = alpha * c / T * dD/da + (1 - alpha) * (softmax(s) - onehot(y)), and
    d loss/dt = w * (softmax(t) - onehot(labels)); dD/da per divergence is in ``_divergence``.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, opts, vocab, chunk_rows, want_student_grad, want_teacher_grad):
        n = student.shape[0]
        compute_dtype = torch.promote_types(student.dtype, torch.float32)
        device = student.device
        pre = row_targets(labels, None, opts, n, device)
        divisor = pre.counted.sum().clamp(min=1).to(compute_dtype)
        # Forward-known part of the row scale: the mean's 1/N, and 0 on ignored rows.
        fwd_scale = row_grad_scale(torch.ones((), dtype=compute_dtype, device=device), pre.counted, divisor,
                                   "sum" if opts.reduction == "none" else opts.reduction)

        stats = [torch.empty(n, dtype=compute_dtype, device=device) for _ in range(3)]
        argmaxes = [torch.empty(n, dtype=torch.long, device=device) for _ in range(2)]
        grad_student = _zero_padding(torch.empty_like(student), vocab) if want_student_grad else None
        grad_teacher = _zero_padding(torch.empty_like(teacher), vocab) if want_teacher_grad else None
        for start in range(0, n, chunk_rows):
            rows = slice(start, min(start + chunk_rows, n))
            chunk_targets = RowTargets(*(None if x is None else x[rows] for x in pre))
            chunk_stats, g_s, g_t = _chunk(
                student[rows, :vocab].to(compute_dtype),
                teacher[rows, :vocab].to(compute_dtype),
                chunk_targets,
                fwd_scale[rows],
                opts,
                want_student_grad,
                want_teacher_grad,
            )
            for buffer, value in zip(stats + argmaxes, chunk_stats, strict=True):
                buffer[rows] = value
            if g_s is not None:
                grad_student[rows, :vocab] = g_s
            if g_t is not None:
                grad_teacher[rows, :vocab] = g_t

        rows = RowStatistics(*stats, *argmaxes)
        targets = row_targets(labels, rows.teacher_argmax, opts, n, device)
        output, _ = finish_rows(rows, student, teacher, targets, opts)
        ctx.grads = (grad_student, grad_teacher)
        ctx.reduction = opts.reduction
        ctx.mark_non_differentiable(*output[1:])
        return tuple(output)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if ctx.grads is None:
            raise RuntimeError(
                "backward through a torch-backend distillation loss ran twice; its gradient is computed in"
                " the forward and handed over once. Recompute the loss for a second backward."
            )
        grads, ctx.grads = ctx.grads, None
        if ctx.reduction == "none":
            factor = grad_loss.reshape(-1, 1)
        elif grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            factor = None  # the common case costs no pass over the gradient
        else:
            factor = grad_loss
        scaled = [g if g is None or factor is None else g.mul_(factor.to(g.dtype)) for g in grads]
        return scaled[0], scaled[1], None, None, None, None, None, None


def _zero_padding(grad: torch.Tensor, vocab: int) -> torch.Tensor:
    grad[:, vocab:] = 0
    return grad


def _log_softmax_and_probs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logsumexp ``[R]``, log-probs ``[R, V]``, probs ``[R, V]``) with one exponential per element.

    Log-probs are clamped at the dtype's lowest finite value so that a zero probability (a -inf logit)
    times its log-prob gives 0, not NaN; NaN inputs still propagate.
    """
    peak = x.amax(-1, keepdim=True)
    probs = (x - peak).exp_()
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    lse = peak + total.log()
    logp = (x - lse).clamp_(min=torch.finfo(x.dtype).min)
    return lse.squeeze(-1), logp, probs


def _chunk(s, t, targets: RowTargets, scale, opts: LossOptions, want_student_grad, want_teacher_grad):
    """Statistics and (optionally) scaled row-loss gradients for a chunk of rows ``[R, V]`` (compute dtype)."""
    inv_t = 1.0 / opts.temperature
    same_t = opts.temperature == 1.0
    a = s if same_t else s * inv_t
    b = t if same_t else t * inv_t
    lse_a, lq, q = _log_softmax_and_probs(a)
    lse_b, lp, p = _log_softmax_and_probs(b)
    div, d_div = _divergence(opts, lq, lp, q, p, want_grad=want_student_grad)
    del lq, lp
    lse_s, q1 = (lse_a, q) if same_t else _log_softmax_and_probs(s)[::2]
    lse_t, p1 = (lse_b, p) if same_t else _log_softmax_and_probs(t)[::2]
    teacher_argmax = t.argmax(-1)
    stats = (div, lse_s, lse_t, s.argmax(-1), teacher_argmax)

    keep = scale.unsqueeze(1)
    ignored = ~targets.counted
    grad_s = grad_t = None
    if want_student_grad:
        grad_s = d_div.mul_(opts.alpha * opts.soft_scale * inv_t)
        if opts.alpha < 1.0:
            hard = teacher_argmax if opts.hard_labels == "teacher_argmax" else targets.hard
            grad_s.add_(_softmax_minus_onehot(q1, hard), alpha=1.0 - opts.alpha)
        grad_s.mul_(keep)
        grad_s[ignored] = 0  # even where an ignored row's logits are garbage (inf * 0 is NaN)
    if want_teacher_grad:
        grad_t = _softmax_minus_onehot(p1, targets.teacher).mul_(keep * opts.teacher_ce_weight)
        grad_t[ignored] = 0
    return stats, grad_s, grad_t


def _softmax_minus_onehot(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    grad = probs.clone()
    grad.scatter_add_(1, target.unsqueeze(1), torch.full_like(grad[:, :1], -1.0))
    return grad


def _divergence(opts: LossOptions, lq, lp, q, p, *, want_grad: bool):
    """Row divergence ``[R]`` and, if wanted, its gradient with respect to the student's scaled logits a.

    For the KLs the gradient is closed-form. For the others, with g = dD/dq taken with q unconstrained,
    the softmax Jacobian gives dD/da = q * (g - sum(q * g)).
    """
    kind, mix = opts.divergence, opts.mix
    if kind == "forward_kl":
        div = (p * (lp - lq)).sum(-1)
        return div, (q - p if want_grad else None)
    if kind == "reverse_kl":
        log_ratio = lq - lp
        div = (q * log_ratio).sum(-1)
        return div, (log_ratio.sub_(div.unsqueeze(1)).mul_(q) if want_grad else None)

    tiny = torch.finfo(q.dtype).tiny
    if kind == "jsd":
        m = mix * p + (1.0 - mix) * q
        lm = m.log().clamp_(min=torch.finfo(q.dtype).min)
        g = (lq - lm).mul_(1.0 - mix)  # dD/dq = (1 - beta) log(q / m)
        q_term = (q * g).sum(-1)  # = (1 - beta) KL(q || m)
        div = mix * (p * (lp - lm)).sum(-1) + q_term
    elif kind == "skew_forward_kl":
        m = mix * p + (1.0 - mix) * q
        lm = m.log().clamp_(min=torch.finfo(q.dtype).min)
        div = (p * (lp - lm)).sum(-1)
        g = (p / m.clamp_(min=tiny)).mul_(-(1.0 - mix))  # dD/dq = -(1 - skew) p / m
        q_term = (q * g).sum(-1)
    elif kind == "skew_reverse_kl":
        m = mix * q + (1.0 - mix) * p
        lm = m.log().clamp_(min=torch.finfo(q.dtype).min)
        g = lq - lm
        div = (q * g).sum(-1)
        # dD/dq = log(q / m) + 1 - skew * q / m; the constant 1 cancels in the softmax Jacobian.
        g.sub_((q / m.clamp_(min=tiny)).mul_(mix))
        q_term = (q * g).sum(-1)
    else:  # tvd
        diff = q - p
        div = 0.5 * diff.abs().sum(-1)
        g = diff.sign_().mul_(0.5)
        q_term = (q * g).sum(-1)
    if not want_grad:
        return div, None
    return div, g.sub_(q_term.unsqueeze(1)).mul_(q)
