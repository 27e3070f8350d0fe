"""Chunked pure-PyTorch distillation loss: the CPU path, and the fallback wherever Triton cannot run.

It is not the test oracle (that is ``tests/oracle.py``, plain float64 PyTorch with autograd); it is a
production backend with the same per-row contract as the Triton kernels (``rows.py``).

The rows are processed a chunk at a time, so the peak extra memory is a few ``[chunk, V]`` temporaries
instead of the several full ``[N, V]`` fp32 tensors that ``log_softmax`` + ``kl_div`` + autograd keep.
On a CPU the gradient must be materialized anyway and recomputing the softmaxes in the backward would
double the exponentials, so when a gradient is wanted it is computed in the forward, chunk by chunk, and
the backward only rescales it by ``grad_output``.
"""

from __future__ import annotations

import torch

from .inputs import FlatInputs
from .options import LossOptions
from .rows import (
    DistillationOutput,
    RowStatistics,
    RowTargets,
    finish_rows,
    forward_row_scale,
    gather_target_logits,
    row_targets,
)
from .torch_divergence import divergence_and_gradient, log_softmax_into, shifted_logsumexp

#: Elements per ``[chunk, V]`` temporary (4 MiB in fp32); about eight such temporaries live at once.
DEFAULT_CHUNK_ELEMENTS = 1 << 20


def torch_distillation_loss(
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
        chunk_rows = default_chunk_rows(vocab)
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
    d loss/dt = w * (softmax(t) - onehot(labels)); dD/da per divergence is in ``torch_divergence.py``.
    With label_weight m mixing the labels into an argmax hard term, CE(s, y) is (1 - m) CE(s, argmax(t)) +
    m CE(s, labels) and onehot(y) is (1 - m) onehot(argmax(t)) + m onehot(labels).

    The first backward hands over the buffers written in the forward (no copy); a second one (gradcheck,
    ``retain_graph=True``) recomputes them from the saved inputs.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, opts, vocab, chunk_rows, want_student_grad, want_teacher_grad):
        ctx.args = (opts, vocab, chunk_rows, want_student_grad, want_teacher_grad)
        rows, grads = _statistics_and_gradients(student, teacher, labels, *ctx.args)
        n, compute_dtype = student.shape[0], rows.divergence.dtype
        targets = row_targets(labels, rows.teacher_argmax, opts, n, student.device)
        logits = gather_target_logits(student, teacher, targets, compute_dtype)
        output, _ = finish_rows(rows, targets, logits.student, logits.teacher, opts, logits.student_label)
        ctx.grads = grads
        ctx.save_for_backward(student, teacher, labels)
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the statistics outputs
        return tuple(output)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        if grad_loss is None:
            return None, None, None, None, None, None, None, None
        if ctx.grads is None:  # a second backward: the first one handed the buffers over
            ctx.grads = _statistics_and_gradients(*ctx.saved_tensors, *ctx.args)[1]
        grads, ctx.grads = ctx.grads, None
        if ctx.args[0].reduction == "none":
            factor = grad_loss.reshape(-1, 1)
        elif grad_loss.device.type == "cpu" and grad_loss.item() == 1.0:
            factor = None  # the common case costs no pass over the gradient
        else:
            factor = grad_loss.reshape(1, 1)
        scaled = [g if g is None or factor is None else _scale_rows(g, factor) for g in grads]
        return scaled[0], scaled[1], None, None, None, None, None, None


def _scale_rows(grad: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``grad`` ``[N, V]`` times ``factor`` ``[N, 1]`` or ``[1, 1]``, and exactly 0 in a row whose factor is 0:
    a row whose ``grad_output`` is 0 counts for nothing, as an ignored row does, even where its gradient is NaN
    (an infinite divergence) and 0 * NaN would be NaN. On CPU only such rows are touched."""
    grad.mul_(factor.to(grad.dtype))
    return _zero_rows(grad, (factor == 0).reshape(-1).expand(grad.shape[0]))


def _statistics_and_gradients(student, teacher, labels, opts, vocab, chunk_rows, want_student_grad, want_teacher_grad):
    """Row statistics and the gradient buffers (row-loss gradients times the mean's 1/N; None if not wanted)."""
    n = student.shape[0]
    compute_dtype = torch.promote_types(student.dtype, torch.float32)
    pre = row_targets(labels, None, opts, n, student.device)
    divisor = pre.counted.sum().clamp(min=1).to(compute_dtype)
    fwd_scale = forward_row_scale(pre.counted, divisor, opts.reduction)
    grad_student = torch.empty_like(student) if want_student_grad else None
    grad_teacher = torch.empty_like(teacher) if want_teacher_grad else None
    rows = stream_rows(student, teacher, pre, fwd_scale, opts, vocab, chunk_rows, grad_student, grad_teacher)
    return rows, (grad_student, grad_teacher)


def stream_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: RowTargets,
    scale: torch.Tensor,
    opts: LossOptions,
    vocab: int,
    chunk_rows: int,
    grad_student: torch.Tensor | None = None,
    grad_teacher: torch.Tensor | None = None,
) -> RowStatistics:
    """Row statistics of ``[N, *]`` logits, a chunk of rows at a time; optionally writes row-loss gradients.

    Args:
        targets: counted mask and label targets (its ``hard`` is ignored in ``teacher_argmax`` mode).
        scale: ``[N]`` factor on each row's loss gradient (0 on ignored rows).
        grad_student, grad_teacher: ``[N, *]`` buffers for the gradients, or None. Every column is written
            (zeros on padding columns). They must not alias the logits.
    """
    for grad in (grad_student, grad_teacher):
        if grad is not None:
            grad[:, vocab:] = 0
    n = student.shape[0]
    compute_dtype = torch.promote_types(student.dtype, torch.float32)
    stats = [torch.empty(n, dtype=compute_dtype, device=student.device) for _ in range(5)]
    argmaxes = [torch.empty(n, dtype=torch.long, device=student.device) for _ in range(2)]
    # [chunk, V] buffers reused by every chunk (no allocation, no page faults per chunk): five for the
    # math, plus one per gradient stored in a narrower dtype, which is accumulated in the compute dtype.
    narrow = sum(g is not None and g.dtype != compute_dtype for g in (grad_student, grad_teacher))
    workspace = torch.empty(5 + narrow, min(chunk_rows, n), vocab, dtype=compute_dtype, device=student.device)
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        chunk_stats = _chunk(
            student[rows, :vocab],
            teacher[rows, :vocab],
            RowTargets(*(None if x is None else x[rows] for x in targets)),
            scale[rows],
            opts,
            workspace[:, : rows.stop - rows.start],
            None if grad_student is None else grad_student[rows, :vocab],
            None if grad_teacher is None else grad_teacher[rows, :vocab],
        )
        for buffer, value in zip(stats + argmaxes, chunk_stats, strict=True):
            buffer[rows] = value
    return RowStatistics(*stats, *argmaxes)


def fused_linear_chunk(logits_s, logits_t, labels, pre, scale, opts, vocab, student_grad, teacher_grad):
    """One token chunk of ``fused_linear_distillation_loss``: row statistics of ``[R, *]`` logits and, where
    wanted, the row-loss gradients times ``scale`` ``[R]`` (None: statistics only) in fresh buffers.

    Returns ``(rows, targets, TargetLogits), (grad_s, grad_t)``, the contract
    ``triton_backend.fused_linear_chunk`` shares; ``pre`` holds the label targets.
    """
    grad_s = torch.empty_like(logits_s) if student_grad else None
    grad_t = torch.empty_like(logits_t) if teacher_grad else None
    if scale is None:
        scale = torch.zeros(logits_s.shape[0], dtype=torch.float32, device=logits_s.device)
    chunk_rows = default_chunk_rows(vocab)
    rows = stream_rows(logits_s, logits_t, pre, scale, opts, vocab, chunk_rows, grad_s, grad_t)
    targets = row_targets(labels, rows.teacher_argmax, opts, logits_s.shape[0], logits_s.device)
    return (rows, targets, gather_target_logits(logits_s, logits_t, targets, rows.divergence.dtype)), (grad_s, grad_t)


def default_chunk_rows(vocab: int) -> int:
    """Rows per chunk so that one ``[chunk, V]`` temporary holds ``DEFAULT_CHUNK_ELEMENTS``."""
    return max(1, DEFAULT_CHUNK_ELEMENTS // vocab)


def _load(x: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """``x`` in the compute dtype: itself, or a copy in ``buffer``."""
    return x if x.dtype == buffer.dtype else buffer.copy_(x)


def _chunk(s, t, targets: RowTargets, scale, opts: LossOptions, workspace, grad_s, grad_t):
    """Statistics of a chunk of rows ``[R, V]``; writes the scaled row-loss gradients into ``grad_s``/``grad_t``.

    ``workspace`` is ``[5 + k, R, V]`` in the compute dtype, k the number of gradients in a narrower dtype;
    ``grad_s``/``grad_t`` are views of the gradient buffers (or None when not wanted).
    """
    inv_t = 1.0 / opts.temperature
    lq, q, lp, p, scratch, *spare = workspace.unbind(0)
    out_s, out_t = grad_s, grad_t
    if grad_s is not None and grad_s.dtype != lq.dtype:  # accumulate in fp32, round once at the end
        grad_s = spare.pop(0)
    if grad_t is not None and grad_t.dtype != lq.dtype:
        grad_t = spare.pop(0)
    *lse_a, student_argmax = log_softmax_into(_load(s, lq), lq, q, inv_t)
    *lse_b, teacher_argmax = log_softmax_into(_load(t, lp), lp, p, inv_t)
    # alpha = 0 leaves the soft term out of the loss, its gradient too (an infinite row's NaN times 0 is NaN).
    soft_grad = grad_s if opts.alpha > 0 else None
    div = divergence_and_gradient(opts, lq, lp, q, p, scratch, soft_grad)
    if opts.temperature == 1.0:
        lse_s, lse_t = lse_a, lse_b
    else:  # the cross-entropies are at T=1
        lse_s, lse_t = shifted_logsumexp(s, lq.dtype), shifted_logsumexp(t, lp.dtype)
    stats = (div, *lse_s, *lse_t, student_argmax, teacher_argmax)

    keep = scale.unsqueeze(1)
    # A row whose scale is 0 (ignored, or a zero grad_output in the fused-linear backward) gets exactly 0,
    # even where its gradient is NaN or its logits are garbage (inf * 0 is NaN).
    dropped = scale == 0
    if grad_s is not None:
        if soft_grad is None:
            grad_s.zero_()
        else:
            grad_s.mul_(opts.alpha * opts.soft_scale * inv_t)
        if opts.alpha < 1.0:
            hard = teacher_argmax if opts.argmax_target else targets.hard
            mix = (targets.hard_label, opts.label_mix)  # the labels' share of the one-hot (label_weight)
            _add_softmax_minus_onehot(grad_s, s, q, lse_s, hard, 1.0 - opts.alpha, inv_t, *mix)
        _zero_rows(grad_s.mul_(keep), dropped)
    if grad_t is not None:
        grad_t.zero_()
        _add_softmax_minus_onehot(grad_t, t, p, lse_t, targets.teacher, opts.teacher_ce_weight, inv_t)
        _zero_rows(grad_t.mul_(keep), dropped)
    for out, grad in ((out_s, grad_s), (out_t, grad_t)):
        if out is not None and out is not grad:
            out.copy_(grad)
    return stats


def _zero_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Set the rows of ``grad`` ``[R, V]`` where ``rows`` ``[R]`` (bool) is True to exactly 0.

    On CPU only those rows are touched (none, usually); elsewhere a fill pass, which needs no host sync.
    """
    if rows.device.type != "cpu":
        return grad.masked_fill_(rows.unsqueeze(1), 0.0)
    if rows.any():
        grad[rows] = 0.0
    return grad


def _add_softmax_minus_onehot(grad, logits, probs_at_t, lse, target, weight, inv_t, label=None, share=0.0):
    """grad += weight * (softmax(logits) - onehot(target)), the cross-entropy gradient at T=1.

    ``lse`` is the (max, log sum exp(logits - max)) pair of the logits at T=1. With a second target ``label``
    the one-hot is split, ``1 - share`` at ``target`` and ``share`` at ``label``: the gradient of
    ``(1 - share) CE(target) + share CE(label)`` (label_weight), in the same pass.
    """
    if inv_t == 1.0:
        grad.add_(probs_at_t, alpha=weight)
    else:
        peak, log_sum = (x.unsqueeze(1) for x in lse)
        grad.add_((logits.to(grad.dtype) - peak).sub_(log_sum).exp_(), alpha=weight)
    if label is None:
        grad.scatter_add_(1, target.unsqueeze(1), torch.full_like(grad[:, :1], -weight))
        return
    grad.scatter_add_(1, target.unsqueeze(1), torch.full_like(grad[:, :1], -weight * (1.0 - share)))
    grad.scatter_add_(1, label.unsqueeze(1), torch.full_like(grad[:, :1], -weight * share))
