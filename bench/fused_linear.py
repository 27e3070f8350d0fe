"""Case ``fused_linear``: the loss from last hidden states and lm_head weights (frozen teacher).

Providers (forward KL at T=1, mean over tokens; ``fwd+bwd`` gives the student's hidden and weight gradients):
  lit-triton  fused_linear_distillation_loss with the Triton kernels (CUDA only)
  lit-torch   fused_linear_distillation_loss with the chunked PyTorch path
  eager       both logits materialized (teacher's under no_grad), then the eager loss of the logits case
  compile     torch.compile of ``eager``
  liger       Liger-Kernel's chunked ``LigerFusedLinearJSDLoss`` with beta=0 (forward KL) and no hard loss
              (CUDA, when liger_kernel is installed)
The rate is TFLOP/s of the projections: 2·N·(H_s + H_t)·V forward, plus 4·N·H_s·V for dX and dW.

The lit providers project fp32 chunk logits from bf16 inputs (fp32-output GEMMs on CUDA) and sum a bf16
weight's gradient in the bf16 buffer they return; the chunk size comes from a memory plan
(``lit_distill.kernels.linear_plan.planned_extra_bytes``, which counts what "extra" measures: beyond the
inputs and the returned gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lit_distill.kernels import fused_linear_distillation_loss

from .logits import eager_loss

PROVIDERS = ("lit-triton", "lit-torch", "eager", "compile", "liger")
RATE_UNIT = "TFLOP/s"


def eager_fused(h_s, w_s, h_t, w_t, divergence: str) -> torch.Tensor:
    with torch.no_grad():
        teacher_logits = F.linear(h_t, w_t)
    return eager_loss(F.linear(h_s, w_s), teacher_logits, divergence)


def make_loss_fn(provider: str, divergence: str):
    if provider == "eager":
        return lambda *x: eager_fused(*x, divergence)
    if provider == "compile":
        compiled = torch.compile(eager_fused, dynamic=False)
        return lambda *x: compiled(*x, divergence)
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        if divergence != "forward_kl":
            raise ValueError("the liger fused-linear provider is benchmarked for forward_kl (beta=0) only")
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0)

        def liger_loss(h_s, w_s, h_t, w_t):
            labels = torch.zeros(h_s.shape[0], dtype=torch.long, device=h_s.device)
            return liger(h_s, w_s, h_t, w_t, labels, None, None)

        return liger_loss
    backend = {"lit-triton": "triton", "lit-torch": "torch"}[provider]
    return lambda h_s, w_s, h_t, w_t: fused_linear_distillation_loss(
        h_s, w_s, h_t, w_t, divergence=divergence, backend=backend
    ).loss


def make_inputs(shape: dict, dtype: torch.dtype, device: str):
    """((student hidden, student weight, teacher hidden, teacher weight), tensors that receive gradients)."""
    gen = torch.Generator(device=device).manual_seed(0)
    n, h, v = shape["N"], shape["H"], shape["V"]
    h_t = shape.get("H_teacher", h)

    def randn(*size, scale=1.0):
        return torch.randn(size, generator=gen, device=device).mul_(scale).to(dtype)

    student_hidden = randn(n, h).requires_grad_()
    student_weight = randn(v, h, scale=h**-0.5).requires_grad_()
    inputs = (student_hidden, student_weight, randn(n, h_t), randn(v, h_t, scale=h_t**-0.5))
    return inputs, [student_hidden, student_weight]


def work(shape: dict, dtype: torch.dtype, mode: str) -> float:
    """Projection FLOPs in TFLOP."""
    n, h, v = shape["N"], shape["H"], shape["V"]
    h_t = shape.get("H_teacher", h)
    flops = 2 * n * (h + h_t) * v + (4 * n * h * v if mode == "fwd+bwd" else 0)
    return flops / 1e12
