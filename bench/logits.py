"""Case ``logits``: the distillation loss over materialized ``[N, V]`` logits.

Providers (each computes the mean-over-tokens loss at T=1 and, in ``fwd+bwd``, the student's gradient):
  lit-triton  lit_distill's fused Triton kernels (CUDA only)
  lit-torch   lit_distill's chunked PyTorch path
  eager       log_softmax + kl_div in eager PyTorch with an fp32 upcast (what most trainers do)
  compile     torch.compile of ``eager``
  liger       Liger-Kernel's KL / JSD losses on torch log-softmaxes (CUDA, when liger_kernel is installed)
The rate is GB/s: the bytes a two-pass design must move (read both rows twice and write the gradient;
forward only: read both once) over the time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lit_distill.kernels import distillation_loss

PROVIDERS = ("lit-triton", "lit-torch", "eager", "compile", "liger")
RATE_UNIT = "GB/s"


def eager_loss(student: torch.Tensor, teacher: torch.Tensor, divergence: str, beta: float = 0.5) -> torch.Tensor:
    """The usual PyTorch formulation: fp32 log-softmaxes, then ``kl_div``; mean over rows."""
    log_q = F.log_softmax(student.float(), dim=-1)
    log_p = F.log_softmax(teacher.float(), dim=-1)
    rows = student.shape[0]
    if divergence == "forward_kl":
        return F.kl_div(log_q, log_p, log_target=True, reduction="sum") / rows
    if divergence == "reverse_kl":
        return F.kl_div(log_p, log_q, log_target=True, reduction="sum") / rows
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    kl_p = F.kl_div(log_m, log_p, log_target=True, reduction="sum")
    kl_q = F.kl_div(log_m, log_q, log_target=True, reduction="sum")
    return (beta * kl_p + (1 - beta) * kl_q) / rows


def make_loss_fn(provider: str, divergence: str):
    if provider == "eager":
        return lambda s, t: eager_loss(s, t, divergence)
    if provider == "compile":
        compiled = torch.compile(eager_loss, dynamic=False)
        return lambda s, t: compiled(s, t, divergence)
    if provider == "liger":
        return _liger_loss_fn(divergence)
    backend = {"lit-triton": "triton", "lit-torch": "torch"}[provider]
    return lambda s, t: distillation_loss(s, t, divergence=divergence, backend=backend).loss


def _liger_loss_fn(divergence: str):
    from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss

    if divergence == "jsd":
        jsd = LigerJSD(beta=0.5)
        return lambda s, t: jsd(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1))
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    if divergence == "forward_kl":  # KL(p || q): input log q, target log p
        return lambda s, t: kl(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1))
    return lambda s, t: kl(F.log_softmax(t.float(), -1), F.log_softmax(s.float(), -1))


def make_inputs(shape: dict, dtype: torch.dtype, device: str):
    """((student, teacher), tensors that receive gradients)."""
    gen = torch.Generator(device=device).manual_seed(0)
    size = (shape["N"], shape["V"])
    student = torch.randn(size, generator=gen, device=device).mul_(2).to(dtype).requires_grad_()
    teacher = torch.randn(size, generator=gen, device=device).mul_(2).to(dtype)
    return (student, teacher), [student]


def work(shape: dict, dtype: torch.dtype, mode: str) -> float:
    """Bytes a two-pass design must move."""
    element = torch.finfo(dtype).bits // 8
    return (2 if mode == "fwd" else 5) * shape["N"] * shape["V"] * element / 1e9
