"""How the fused-linear loss multiplies, and what it allocates for a chunk of tokens.

- The matmuls: half-precision inputs give fp32 chunk logits (products of half numbers are exact in fp32)
  through an fp32-output GEMM where the device has one (``torch.mm(..., out_dtype=torch.float32)``, CUDA
  in torch >= 2.8: the half-precision matmul's speed), through fp32 copies of a slice of the weight at a
  time on CPU (an fp32 GEMM is fast enough there, and far too slow on a GPU), and otherwise in half
  precision, with a warning. :func:`fp32_output_matmul` checks once per device and dtype.
- The memory: :func:`planned_extra_bytes` adds up the buffers the fused-linear path allocates beyond its
  inputs and the gradients it returns, and :func:`choose_chunk_size` picks the chunk that fits a budget.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .torch_backend import default_chunk_rows

#: Bytes :func:`planned_extra_bytes` may plan for. On CUDA 1.375 GiB, which leaves 128 MiB of the 1.5 GiB
#: bar for what the plan does not count (cuBLAS workspaces, the allocator's rounding): at N=8192, H=4096,
#: V=128256 in bf16 that gives 8 chunks of 1024 tokens and 1.22 GiB. On CPU it keeps chunks small against RAM.
MEMORY_BUDGET_BYTES = {"cuda": 1408 << 20, "cpu": 256 << 20}
#: Elements of the fp32 copy of a weight slice that a CPU projection of half-precision inputs holds at once.
CPU_SLICE_ELEMENTS = 1 << 22
#: Devices where half-precision projections without an fp32-output GEMM upcast weight slices to fp32.
UPCAST_DEVICES = ("cpu",)
#: Bytes per token for the per-row statistics, targets and their concatenation (a generous bound).
ROW_BYTES = 256
HALF = (torch.float16, torch.bfloat16)


@functools.cache
def fp32_output_matmul(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm`` and ``torch.addmm`` take ``dtype`` inputs with ``out_dtype=torch.float32`` on ``device``.

    Checked once per (device, dtype) on 2 x 2 tensors. Only a refusal counts as no (an unknown keyword in
    torch < 2.8, no kernel for the device or dtype); out-of-memory and every other error propagate.
    """
    a = torch.ones(2, 2, dtype=dtype, device=device)
    c = torch.zeros(2, 2, dtype=torch.float32, device=device)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
    except torch.cuda.OutOfMemoryError:
        raise
    except (TypeError, NotImplementedError, RuntimeError):
        return False
    return True


@functools.cache
def _warn_half_logits(device: torch.device, dtype: torch.dtype) -> None:
    warnings.warn(
        f"the fused-linear losses: torch {torch.__version__} has no fp32-output matmul for {dtype} on"
        f" {device.type} (torch.mm(..., out_dtype=torch.float32), CUDA in torch >= 2.8), so the chunk logits are"
        f" computed in {dtype}: each logit is rounded to {dtype} (with bf16 about 2e-3 relative error in the"
        " loss and 2e-2 in the gradients, against 1e-6 with fp32 logits), and the fp32 weight gradient of"
        " parameters under autocast is summed through fp32 matmuls, several times slower.",
        stacklevel=_outside_package(),
    )


def _outside_package() -> int:
    """The ``stacklevel`` of the first caller outside ``lit_distill``, for a warning issued by the caller."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("lit_distill."):
        frame, level = frame.f_back, level + 1
    return level


def logits_dtype(device: torch.device, matmul_dtype: torch.dtype) -> torch.dtype:
    """The chunk logits' dtype for matmul inputs in ``matmul_dtype``: fp32 for half precision (unless the device
    can only give it through fp32 GEMMs: then half, with a warning, once), else ``matmul_dtype``."""
    if matmul_dtype not in HALF:
        return matmul_dtype
    if fp32_output_matmul(device, matmul_dtype) or device.type in UPCAST_DEVICES:
        return torch.float32
    _warn_half_logits(device, matmul_dtype)
    return matmul_dtype


class Head(NamedTuple):
    """One model's lm_head as the chunk loop runs it (and :func:`planned_extra_bytes` counts it)."""

    vocab: int  # V, rows of the weight
    hidden: int  # H
    dtype: torch.dtype  # the weight's (and its gradient's)
    matmul_dtype: torch.dtype  # the matmuls' inputs: ``dtype``, or autocast's
    logits_dtype: torch.dtype  # see :func:`logits_dtype`
    bias: bool
    grad: bool  # whether this side's gradients are computed


def head(weight: torch.Tensor, bias: torch.Tensor | None, cast: torch.dtype | None, grad: bool) -> Head:
    """The :class:`Head` of a ``(V, H)`` weight, under autocast to ``cast`` (or None)."""
    matmul = cast or weight.dtype
    logits = logits_dtype(weight.device, matmul)
    return Head(weight.shape[0], weight.shape[1], weight.dtype, matmul, logits, bias is not None, grad)


def project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype) -> torch.Tensor:
    """``[R, V]`` logits ``hidden @ weight.T + bias`` in ``dtype``, ``hidden``/``weight`` in the matmul dtype and
    ``bias`` in ``dtype`` already."""
    if dtype == hidden.dtype:
        return F.linear(hidden, weight, bias)
    if fp32_output_matmul(hidden.device, hidden.dtype):
        out = torch.mm(hidden, weight.t(), out_dtype=dtype)
    else:  # CPU: fp32 copies of a slice of the weight at a time, never of all of it
        out = torch.empty(hidden.shape[0], weight.shape[0], dtype=dtype, device=hidden.device)
        wide = hidden.to(dtype)
        step = max(1, CPU_SLICE_ELEMENTS // max(1, weight.shape[1]))
        for start in range(0, weight.shape[0], step):
            cols = slice(start, start + step)
            torch.mm(wide, weight[cols].to(dtype).t(), out=out[:, cols])
    return out if bias is None else out.add_(bias)


def accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with the products summed in fp32 at least; ``a``/``b`` in the matmul dtype."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)  # half precision: fp32 inside the GEMM, one rounding of the sum
    elif acc.dtype == torch.float32 and fp32_output_matmul(a.device, a.dtype):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # CPU, or no fp32-output GEMM (warned): chunk-sized copies of the operands in acc's dtype
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def planned_extra_bytes(
    num_tokens: int,
    chunk_size: int,
    student: Head,
    teacher: Head | None,
    *,
    device_type: str,
    triton: bool,
    workspace: Callable[[int], int] | None = None,
) -> dict[str, int]:
    """Bytes the fused-linear loss allocates beyond its inputs and the gradients it returns, at its peak, by item.

    ``teacher`` None plans the sparse-teacher form (one head): both of its backends write the logit gradient
    as the Triton one here does, and ``workspace(rows)`` gives its PyTorch path's workspace in bytes.

    The peak is inside a chunk of ``R = min(chunk_size, num_tokens)`` tokens, in one of three phases: the
    projections (both logits, CPU fp32 copies), the backend's step (both logits, the gradient buffers, the
    PyTorch backend's workspace) or the fold into the accumulators after the logits are freed (the gradient
    buffers, their casts, operand copies); the items of the largest phase are returned, with those that
    last the whole chunk or call. Not counted: the gradients returned (dH and dW are the buffers returned,
    in the dtypes of the hidden states and the weight, so there is never an fp32 and a bf16 copy of dW;
    the backward of a mean or sum scales them in place), cuBLAS workspaces and the allocator's rounding
    (see ``MEMORY_BUDGET_BYTES``), and libraries' buffers on first use. Items:

    - ``logits``: ``R x V`` per model in the logits' dtype (fp32 for half inputs).
    - ``cpu copies``: on CPU with half inputs, the fp32 copy of the chunk's hidden states and of one weight
      slice (``CPU_SLICE_ELEMENTS``).
    - ``logit gradients``: per side with a gradient. Triton (and the sparse form) writes it over the logits
      when the dtypes agree (then it outlives them, in the fold), else ``R x V`` in the matmul dtype; the
      dense PyTorch backend writes ``R x V`` in the logits' dtype.
    - ``gradient casts``: the PyTorch backend's gradient cast to the matmul dtype (half inputs).
    - ``torch workspace``: the PyTorch backend's ``[5 + k, rows, vocab]`` buffers (k gradients narrower
      than its compute dtype).
    - ``operand copies``: autocast's dH before its cast (``R x H``), and fp32 copies of ``R x (V + H)``
      operands where fp32 parameters under autocast sum their weight gradient without an fp32-output GEMM.
    - ``weight and bias casts``: autocast's copy of a weight in the matmul dtype, a bias in the logits'
      dtype, the fp32 sum of a half-precision bias's gradient.
    - ``hidden casts``: autocast's copy of the chunk's hidden states in the matmul dtype.
    - ``row statistics``: ``ROW_BYTES`` per token.
    """
    r = min(chunk_size, num_tokens)
    sides = (student,) if teacher is None else (student, teacher)
    kernel_writes = triton or teacher is None  # the gradient's buffer as the Triton kernels write it
    project = {"logits": 0, "cpu copies": 0}
    step = {"logits": 0, "logit gradients": 0, "torch workspace": 0}
    fold = {"logit gradients": 0, "gradient casts": 0, "operand copies": 0}
    always = {"weight and bias casts": 0, "hidden casts": 0, "row statistics": num_tokens * ROW_BYTES}
    for side in sides:
        logit, matmul = side.logits_dtype.itemsize, side.matmul_dtype.itemsize
        project["logits"] = step["logits"] = step["logits"] + r * side.vocab * logit
        if device_type in UPCAST_DEVICES and side.matmul_dtype in HALF and side.logits_dtype != side.matmul_dtype:
            rows = min(side.vocab, CPU_SLICE_ELEMENTS // max(1, side.hidden))
            project["cpu copies"] = max(project["cpu copies"], (r + rows) * side.hidden * 4)
        autocast = side.dtype != side.matmul_dtype
        if autocast:
            always["weight and bias casts"] += side.vocab * side.hidden * matmul
            always["hidden casts"] += r * side.hidden * matmul
        if side.bias:
            always["weight and bias casts"] += side.vocab * logit * (side.dtype != side.logits_dtype)
            always["weight and bias casts"] += side.vocab * 4 * (side.grad and side.dtype in HALF)
        if not side.grad:
            continue
        in_place = kernel_writes and side.matmul_dtype == side.logits_dtype
        buffer = r * side.vocab * (matmul if kernel_writes else logit)
        step["logit gradients"] += 0 if in_place else buffer
        fold["logit gradients"] += buffer
        cast = not kernel_writes and side.matmul_dtype != side.logits_dtype
        fold["gradient casts"] += r * side.vocab * matmul * cast
        if autocast:  # dH before its cast; without an fp32-output GEMM, fp32 copies of dW's operands
            fp32_gemm = side.logits_dtype != side.matmul_dtype and device_type not in UPCAST_DEVICES
            fold["operand copies"] += r * side.hidden * matmul
            fold["operand copies"] += 0 if fp32_gemm else r * (side.vocab + side.hidden) * 4
    if not triton and workspace is not None:
        step["torch workspace"] = workspace(r)
    elif not triton:
        vocab = min(student.vocab, teacher.vocab)
        compute = torch.promote_types(student.logits_dtype, torch.float32)
        narrow = sum(side.grad and side.logits_dtype != compute for side in (student, teacher))
        step["torch workspace"] = (5 + narrow) * min(r, default_chunk_rows(vocab)) * vocab * compute.itemsize
    return {**always, **max(project, step, fold, key=lambda phase: sum(phase.values()))}


def choose_chunk_size(
    num_tokens: int,
    student: Head,
    teacher: Head | None,
    *,
    device_type: str,
    triton: bool,
    budget: int | None = None,
    workspace: Callable[[int], int] | None = None,
) -> int:
    """Tokens per chunk: all of them if what the chunk adds to :func:`planned_extra_bytes` (beyond what no chunk
    size changes: row statistics, autocast's weight copies) fits ``budget`` (default: ``MEMORY_BUDGET_BYTES`` of
    the device type), else the fewest equal chunks that fit, a multiple of 64 (GEMM-friendly) where the
    largest chunk that fits is at least 64. Never less than one token.
    """
    if budget is None:
        budget = MEMORY_BUDGET_BYTES.get(device_type, MEMORY_BUDGET_BYTES["cpu"])

    def planned(chunk: int) -> int:
        kw = {"device_type": device_type, "triton": triton, "workspace": workspace}
        plan = planned_extra_bytes(num_tokens, chunk, student, teacher, **kw)
        return sum(plan.values())

    fixed = planned(0)

    def fits(chunk: int) -> bool:
        return planned(chunk) - fixed <= budget

    if num_tokens <= 1 or fits(num_tokens):
        return max(1, num_tokens)
    low, high = 1, num_tokens - 1  # the largest chunk that fits (or 1), by bisection: the plan grows with it
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    granule = 64 if low >= 64 else 1
    largest = low - low % granule
    count = -(-num_tokens // largest)
    even = -(-num_tokens // count)
    return even + -even % granule  # at most ``largest``, itself a multiple of the granule


class GradientAccumulators:
    """The gradients of one ``hidden @ weight.T + bias`` projection (a side of the fused-linear losses, dense or
    sparse), each in the dtype of the tensor it belongs to.

    dH is written chunk by chunk. dW is summed over the chunks in place, in the buffer that is returned
    (never an fp32 and a half copy at once): in fp32 for fp32 weights (fp32 inputs, or fp32 parameters
    under autocast), in bf16 for bf16 weights, where each chunk's ``addmm`` sums its products in fp32 and
    rounds the running sum once. So its error grows with the number of chunks. Against float64 on the same
    bf16 inputs (N=1024, H=16, V=2053, forward KL and CE), dW's largest error over its largest entry
    (and the relative RMS error) is 2.3e-3 (1.8e-3) in 1 chunk, as an fp32 sum rounded once would be,
    4.0e-3 (3.3e-3) in 8, 7.5e-3 (5.2e-3) in 64 and 8.4e-3 (5.9e-3) in 256. Chunks are large where the
    memory allows: the CUDA budget gives 8 chunks of 1024 tokens at N=8192, H=4096, V=128256, where an fp32
    accumulator would have taken 1 GiB more than the bf16 gradient.
    db is summed in fp32 (V elements) and cast at the end.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
        self.weight = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
        sum_dtype = None if bias is None else torch.promote_types(bias.dtype, torch.float32)
        self.bias = None if bias is None else torch.zeros(bias.shape, dtype=sum_dtype, device=bias.device)

    def add(self, grad_logits: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, rows: slice) -> None:
        """Fold in a chunk's ``[R, V]`` logit gradient; ``hidden`` ``[R, H]`` and ``weight`` in its dtype."""
        if self.hidden.dtype == grad_logits.dtype:
            torch.mm(grad_logits, weight, out=self.hidden[rows])
        else:  # autocast: dH rounded to the matmul dtype, as nn.Linear's would be
            self.hidden[rows] = grad_logits @ weight
        accumulate(self.weight, grad_logits.t(), hidden)
        if self.bias is not None:
            self.bias.add_(grad_logits.sum(0, dtype=self.bias.dtype))

    def scaled(self, factor: torch.Tensor | None, bias: torch.Tensor | None) -> tuple:
        grads = [self.hidden, self.weight, self.bias]
        if factor is not None:  # a 0-dim fp32 factor: one rounding of each product, in the gradient's dtype
            grads = [None if g is None else g.mul_(factor) for g in grads]
        hidden, weight, b = grads
        return hidden, weight, None if b is None else b.to(bias.dtype)
