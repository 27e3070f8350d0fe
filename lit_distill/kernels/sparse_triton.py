"""Sparse-teacher kernels (Triton): the student's tail statistics in the forward, its gradient in the backward.

Passes over the student's row: 2, as for a cross-entropy. The statistics pass (one program per row) finds
the online max, log-sum-exp (at T, and at T=1 when a cross-entropy needs it) and argmax of the tail, the
columns outside the teacher's slots; the gradient pass writes the grad_output-scaled gradient once, the tail
columns from a per-row formula and then the K slot columns over them. The K slots' own numbers are O(N K)
gathers and the bucket math of ``sparse_rows.bucket_rows``, shared with the PyTorch path.

Keeping the slots out of the tail: each row's ids are sorted (on the host; [N, K] is small) and held in
registers, and the statistics pass sets the slots of each block to -inf, taking them in order (one [K] min
reduction per slot, plus one per block). A per-row bitmap of slot columns, read alongside the logits, was
the alternative: an [N, V/32] buffer to clear and fill, V/8 more bytes read per row, and a 32-bit load per
thread per block next to the 128-bit logits loads (whose loop ``tests/test_compile.py`` keeps pure).
Subtracting the slots from the full sum is no option: it cancels when the student is confident.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .rows import DistillationOutput, row_grad_scale, row_targets
from .sparse_rows import SparseRows, bucket_rows, finish, shift_of, slot_values, tail_coefficients, total_log_sum

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
#: The sorted slot list's "no slot": past every column.
NO_SLOT = tl.constexpr(2**31 - 1)


@triton.jit
def _load_block(row_ptr, cols, width, vocab):
    """A block of a logit row in fp32, -inf at padding; masked on the width (a multiple of 16 keeps loads
    128-bit), the vocabulary only after the load."""
    x = tl.load(row_ptr + cols, mask=cols < width, other=float("-inf")).to(tl.float32)
    return tl.where(cols < vocab, x, float("-inf"))


@triton.jit
def _shift(row_max):
    return tl.where(row_max == float("-inf"), 0.0, row_max)


@triton.jit
def _mask_slots(s, cols, end, ids, nxt):
    """-inf at the slot columns of the block ``s`` (columns ``cols``, below ``end``): the sorted ids below
    ``end``, from ``nxt`` (the smallest id left) on; each is consumed (set to NO_SLOT) once masked."""
    while nxt < end:
        s = tl.where(cols == nxt, float("-inf"), s)
        ids = tl.where(ids == nxt, NO_SLOT, ids)
        nxt = tl.min(ids, 0)
    return s, ids, nxt


@triton.jit
def _fold(s, start, row_max, sum_t, sum_1, arg, c, T1: tl.constexpr):
    """Fold a block (fp32, -inf at slots and padding) into the running max, sums and argmax of the tail."""
    block_max = tl.max(s, 0)
    if block_max > row_max:  # block-uniform and rare; strictly greater: the first max wins, as torch.argmax
        arg = start + tl.argmax(s, 0)
    shift = _shift(tl.maximum(row_max, block_max))
    ds = s - shift  # shifted before scaling: exact near the max
    sum_t = sum_t * tl.exp2((row_max - shift) * c) + tl.sum(tl.exp2(ds * c), 0)
    if T1:
        sum_1 = sum_1 * tl.exp2((row_max - shift) * LOG2E) + tl.sum(tl.exp2(ds * LOG2E), 0)
    return tl.maximum(row_max, block_max), sum_t, sum_1, arg


@triton.jit
def _tail_stats_kernel(
    s_ptr,  # [N, s_width] student logits, row stride s_stride, unit column stride
    sorted_ptr,  # [N, K_PAD] int32 slot ids sorted ascending, NO_SLOT at empty slots and padding
    stats_ptr,  # [3, N] fp32 out: tail max, log sum exp((s - max) / T), log sum exp(s - max) (NaN unless T1)
    argmax_ptr,  # [N] int64 out: first index of the tail's max
    s_stride,
    s_width,
    n_rows,
    vocab,
    inv_t,
    K_PAD: tl.constexpr,
    T1: tl.constexpr,  # T != 1 and the cross-entropy is wanted
    BLOCK: tl.constexpr,
):
    """The forward pass, one program per row; whole blocks unmasked, the partial last block masked."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_stride
    offs = tl.arange(0, BLOCK)
    ids = tl.load(sorted_ptr + row * K_PAD + tl.arange(0, K_PAD))
    nxt = tl.min(ids, 0)
    c = inv_t * LOG2E
    row_max = tl.full([], float("-inf"), tl.float32)
    sum_t = tl.zeros([], tl.float32)
    sum_1 = tl.zeros([], tl.float32)
    arg = tl.zeros([], tl.int32)
    whole = vocab - vocab % BLOCK
    for start in range(0, whole, BLOCK):
        s = tl.load(s_row + start + offs).to(tl.float32)
        s, ids, nxt = _mask_slots(s, start + offs, start + BLOCK, ids, nxt)
        row_max, sum_t, sum_1, arg = _fold(s, start, row_max, sum_t, sum_1, arg, c, T1)
    if whole < vocab:
        s = _load_block(s_row, whole + offs, s_width, vocab)
        s, ids, nxt = _mask_slots(s, whole + offs, vocab, ids, nxt)
        row_max, sum_t, sum_1, arg = _fold(s, whole, row_max, sum_t, sum_1, arg, c, T1)
    tl.store(stats_ptr + row, row_max)
    tl.store(stats_ptr + n_rows + row, tl.log2(sum_t) * LN2)
    if T1:
        tl.store(stats_ptr + 2 * n_rows + row, tl.log2(sum_1) * LN2)
    tl.store(argmax_ptr + row, arg.to(tl.int64))


@triton.jit
def _tail_grad_kernel(
    s_ptr,  # [N, s_width] student logits
    grad_ptr,  # [N, s_width] out: d loss / d logits, rounded once to its own dtype (the fused-linear form's bf16
    # gradient of fp32 logits); may be s_ptr (each tile is read first)
    coef_ptr,  # [5, N] fp32: tail shift, a, b, h, row scale (see ``tail_coefficients``)
    target_ptr,  # [N] int64 cross-entropy target
    ids_ptr,  # [N, K_PAD] int64 slot ids, -1 at empty slots and padding
    slot_ptr,  # [N, K_PAD] fp32 gradient at each slot's column
    s_stride,
    grad_stride,
    s_width,
    n_rows,
    vocab,
    inv_t,
    span,  # columns per program, a multiple of BLOCK
    K_PAD: tl.constexpr,
    SAME_T: tl.constexpr,
    HARD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The backward pass over (row, span of columns): a tail column gets a exp((s - shift) / T) +
    b exp(s - shift) - h [column = target], zero at padding; then the slots in the span are overwritten."""
    row = tl.program_id(0).to(tl.int64)
    lo = tl.program_id(1) * span
    s_row = s_ptr + row * s_stride
    g_row = grad_ptr + row * grad_stride
    shift = tl.load(coef_ptr + row)
    a = tl.load(coef_ptr + n_rows + row)
    b = tl.load(coef_ptr + 2 * n_rows + row)
    h = tl.load(coef_ptr + 3 * n_rows + row)
    live = tl.load(coef_ptr + 4 * n_rows + row) != 0.0  # an ignored row gets exactly 0, whatever its logits
    target = tl.load(target_ptr + row)
    c = inv_t * LOG2E
    offs = tl.arange(0, BLOCK)
    for start in range(lo, tl.minimum(lo + span, s_width), BLOCK):
        cols = start + offs
        ds = _load_block(s_row, cols, s_width, vocab) - shift
        grad = a * tl.exp2(ds * c)
        if HARD:
            if not SAME_T:
                grad += b * tl.exp2(ds * LOG2E)
            grad -= tl.where(cols == target, h, 0.0)
        grad = tl.where(tl.where(live, cols < vocab, False), grad, 0.0)
        tl.store(g_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < s_width)
    tl.debug_barrier()  # the slot stores below land after every thread's tile store above
    ids = tl.load(ids_ptr + row * K_PAD + tl.arange(0, K_PAD))
    values = tl.load(slot_ptr + row * K_PAD + tl.arange(0, K_PAD))
    mine = (ids >= lo) & (ids < lo + span)
    tl.store(g_row + ids, values.to(grad_ptr.dtype.element_ty), mask=mine)


def launch_config(vocab: int, rows: int) -> dict[str, int]:
    """Blocks and warps as the dense kernels' (4096-column statistics blocks on 8 warps, capped at 64
    registers so that four programs fit an SM; 2048-column gradient blocks on 4 warps), and gradient spans
    that give a few rows at least ~512 programs."""
    row_block = min(4096, triton.next_power_of_2(vocab))
    grad_block = min(2048, triton.next_power_of_2(vocab))
    blocks = triton.cdiv(vocab, grad_block)
    per_program = max(1, blocks // max(1, 512 // max(rows, 1)))
    return {"row_block": row_block, "row_warps": 8 if row_block >= 2048 else 4, "row_registers": 64,
            "grad_block": grad_block, "grad_warps": 4, "span": per_program * grad_block}  # fmt: skip


def _padded(ids: torch.Tensor, fill: int, dtype, sort: bool) -> torch.Tensor:
    """``[N, K]`` ids as ``[N, K_PAD]`` (a power of two): empty slots and padding hold ``fill``."""
    k_pad = max(16, triton.next_power_of_2(ids.shape[1]))
    out = torch.full((ids.shape[0], k_pad), fill, dtype=dtype, device=ids.device)
    keyed = torch.where(ids >= 0, ids, fill).to(dtype)
    out[:, : ids.shape[1]] = keyed.sort(-1).values if sort else keyed
    return out


def _forward_state(student, ids, logprobs, labels, opts, tail, vocab):
    """Statistics pass and bucket math: (SparseRows, the state the gradient pass needs)."""
    n = student.shape[0]
    t1 = labels is not None and opts.temperature != 1.0
    stats = torch.empty(3, n, dtype=torch.float32, device=student.device)
    tail_argmax = torch.empty(n, dtype=torch.long, device=student.device)
    cfg = launch_config(vocab, n)
    if n > 0:
        slots_sorted = _padded(ids, 2**31 - 1, torch.int32, sort=True)
        _tail_stats_kernel[(n,)](
            student, slots_sorted, stats, tail_argmax, student.stride(0), student.shape[1], n, vocab,
            1.0 / opts.temperature, K_PAD=slots_sorted.shape[1], T1=t1, BLOCK=cfg["row_block"],
            num_warps=cfg["row_warps"], maxnreg=cfg["row_registers"],
        )  # fmt: skip
    tail_max, tail_lsum, tail_lsum1 = stats.unbind(0)
    slot_logits = torch.where(ids >= 0, student.gather(1, ids.clamp(min=0)).float(), -float("inf"))
    slots = bucket_rows(slot_logits, ids, logprobs, tail_max, tail_lsum, tail_argmax, opts, tail)
    lse1 = total_log_sum(slot_logits, tail_max, tail_lsum1, 1.0) if t1 else (slots.row_max, slots.log_sum)
    safe = None if labels is None else torch.where(labels == opts.ignore_index, 0, labels)
    s_y = None if safe is None else student.gather(1, safe[:, None]).squeeze(1).float()
    rows = SparseRows(slots.divergence, *lse1, slots.student_argmax, slots.teacher_top, s_y)
    return rows, (slots, slot_logits, shift_of(tail_max), lse1, safe)


def _write_gradient(student, grad, ids, state, scale, opts, vocab):
    """The gradient pass: the row-loss gradients times ``scale`` ``[N]`` into ``grad`` (may be ``student``)."""
    n = student.shape[0]
    if n == 0:
        return
    slots, slot_logits, tail_shift, lse1, safe = state
    labels = safe if safe is not None else torch.zeros(n, dtype=torch.long, device=student.device)
    coef = torch.stack([tail_shift, *tail_coefficients(slots, lse1, tail_shift, scale, opts), scale]).float()
    values = slot_values(slots, slot_logits, ids, labels, scale, opts, lse1).float()
    padded_ids = _padded(ids, -1, torch.long, sort=False)
    padded_values = torch.zeros(padded_ids.shape, dtype=torch.float32, device=student.device)
    padded_values[:, : ids.shape[1]] = values
    cfg = launch_config(vocab, n)
    grid = (n, triton.cdiv(student.shape[1], cfg["span"]))
    _tail_grad_kernel[grid](
        student, grad, coef.contiguous(), labels, padded_ids, padded_values, student.stride(0), grad.stride(0),
        student.shape[1], n, vocab, 1.0 / opts.temperature, cfg["span"], K_PAD=padded_ids.shape[1],
        SAME_T=opts.temperature == 1.0, HARD=opts.alpha < 1.0, BLOCK=cfg["grad_block"], num_warps=cfg["grad_warps"],
    )  # fmt: skip


def triton_sparse_rows(logits, ids, logprobs, labels, opts, tail, vocab, scale=None, grad=None) -> SparseRows:
    """:class:`SparseRows` of ``[R, W]`` logits; with ``grad`` also writes the gradients times ``scale``, computed
    in fp32: ``grad`` may be the logits, or ``[R, W]`` in another dtype (the fused-linear form's chunk: fp32
    logits, the gradient in the matmul's bf16, scaled and cast in the one pass)."""
    rows, state = _forward_state(logits, ids, logprobs, labels, opts, tail, vocab)
    if grad is not None:
        _write_gradient(logits, grad, ids, state, scale.float(), opts, vocab)
    return rows


def triton_sparse_loss(student, ids, logprobs, labels, opts, tail, vocab) -> DistillationOutput:
    return DistillationOutput(*TritonSparseFunction.apply(student, ids, logprobs, labels, opts, tail, vocab))


class TritonSparseFunction(torch.autograd.Function):
    """Sparse-teacher loss on ``[N, V]`` logits: statistics in the forward, the gradient in the backward
    (the math: ``sparse_rows.py``'s module docstring)."""

    @staticmethod
    def forward(ctx, student, ids, logprobs, labels, opts, tail, vocab):
        rows, ctx.state = _forward_state(student, ids, logprobs, labels, opts, tail, vocab)
        output, divisor = finish(rows, labels, opts)
        counted = row_targets(labels, None, opts, student.shape[0], student.device).counted
        ctx.save_for_backward(student, ids, counted, divisor)
        ctx.opts, ctx.vocab = opts, vocab
        ctx.mark_non_differentiable(*output[1:])
        ctx.set_materialize_grads(False)
        return tuple(output)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        student, ids, counted, divisor = ctx.saved_tensors
        if grad_loss is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None, None
        scale = row_grad_scale(grad_loss, counted, divisor, ctx.opts.reduction).float()
        grad = torch.empty_like(student)
        _write_gradient(student, grad, ids, ctx.state, scale, ctx.opts, ctx.vocab)
        return grad, None, None, None, None, None, None
