"""Matmuls of the fused-linear path that keep half-precision inputs' products in fp32.

``project`` forms a token chunk's logits, ``addmm_fp32`` accumulates the weight gradient; both take
bf16/fp16 inputs without rounding anything to half precision on the way (cuBLAS fp32-output GEMMs on
CUDA where the installed PyTorch offers them, fp32 copies of slices on CPU).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

#: Elements of the fp32 copy of a weight slice that a CPU projection of half-precision inputs holds at once.
CPU_WEIGHT_SLICE_ELEMENTS = 1 << 22


def project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``[R, V]`` logits ``hidden @ weight.T + bias``, in fp32 for half-precision inputs (in their dtype otherwise).

    Rounding the logits to half precision (what ``F.linear`` returns) would cost up to 2^-8 of each logit, far more
    than the rounding of the inputs themselves; the products of half-precision numbers are exact in fp32.
    """
    if hidden.dtype not in (torch.float16, torch.bfloat16):
        return F.linear(hidden, weight, bias)
    bias32 = None if bias is None else bias.float()
    if hidden.is_cuda:
        with contextlib.suppress(RuntimeError, TypeError):  # fp32-output GEMM on half inputs, where supported
            out = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
            return out if bias32 is None else out.add_(bias32)
    # CPU: fp32 products, a slice of the vocabulary at a time so that no fp32 copy of the whole weight exists.
    out = torch.empty(hidden.shape[0], weight.shape[0], dtype=torch.float32, device=hidden.device)
    h32 = hidden.float()
    step = max(1, CPU_WEIGHT_SLICE_ELEMENTS // max(1, weight.shape[1]))
    for start in range(0, weight.shape[0], step):
        cols = slice(start, start + step)
        out[:, cols] = F.linear(h32, weight[cols].float(), None if bias32 is None else bias32[cols])
    return out


def addmm_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with ``acc`` fp32 and ``a``/``b`` possibly half precision."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda:
        with contextlib.suppress(RuntimeError, TypeError):  # fp32-output GEMM on half inputs, where supported
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
    acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
