"""Logits-level benchmark: distillation loss over materialized ``[N, V]`` logits.

Providers (each computes the same mean-over-tokens loss at T=1 and, in ``fwd+bwd`` mode, the student's
gradient):
  lit-triton  lit_distill's fused Triton kernels (CUDA only)
  lit-torch   lit_distill's chunked PyTorch path
  eager       log_softmax + kl_div in eager PyTorch, fp32 upcast (what most trainers do)
  compile     torch.compile of ``eager``

Timing: GPU, the median of ``triton.testing.do_bench``; CPU, the median wall time of ``--reps`` runs after
one warm-up. Memory: extra bytes beyond the inputs and the returned gradient buffer; GPU, from
``max_memory_allocated``; CPU, from the peak RSS of a fresh process per provider. ``GB/s`` divides the
bytes a two-pass design must move (read both rows twice, write the gradient once; forward: read once)
by the time.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from lit_distill.kernels import distillation_loss

PROVIDERS = ("lit-triton", "lit-torch", "eager", "compile")
MODES = ("fwd", "fwd+bwd")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


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
    backend = {"lit-triton": "triton", "lit-torch": "torch"}[provider]
    return lambda s, t: distillation_loss(s, t, divergence=divergence, backend=backend).loss


def make_inputs(rows: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    student = torch.randn(rows, vocab, generator=gen, device=device, dtype=torch.float32).mul_(2).to(dtype)
    teacher = torch.randn(rows, vocab, generator=gen, device=device, dtype=torch.float32).mul_(2).to(dtype)
    return student.requires_grad_(), teacher


def floor_bytes(rows: int, vocab: int, dtype: torch.dtype, mode: str) -> int:
    element = torch.finfo(dtype).bits // 8
    return (2 if mode == "fwd" else 5) * rows * vocab * element


def _step(loss_fn, student, teacher, mode):
    if mode == "fwd":
        with torch.no_grad():
            return loss_fn(student, teacher)
    student.grad = None
    loss = loss_fn(student, teacher)
    loss.backward()
    return loss


def measure_cpu_in_process(provider, divergence, mode, rows, vocab, dtype, reps) -> dict:
    """Runs in a fresh process (see ``measure``): time, and peak RSS over the inputs and the gradient."""
    torch.set_num_threads(os.cpu_count() or 1)
    student, teacher = make_inputs(rows, vocab, dtype, "cpu")
    loss_fn = make_loss_fn(provider, divergence)
    grad_bytes = student.numel() * student.element_size() if mode == "fwd+bwd" else 0
    base_rss = _current_rss()
    loss = _step(loss_fn, student, teacher, mode)  # warm-up; also the peak-memory run
    peak_rss = _peak_rss()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        _step(loss_fn, student, teacher, mode)
        times.append(time.perf_counter() - start)
    return {
        "ms": 1e3 * statistics.median(times),
        "extra_bytes": max(0, peak_rss - base_rss - grad_bytes),
        "loss": float(loss),
    }


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def measure_cuda(provider, divergence, mode, rows, vocab, dtype, reps) -> dict:
    import triton.testing

    student, teacher = make_inputs(rows, vocab, dtype, "cuda")
    loss_fn = make_loss_fn(provider, divergence)
    grad_bytes = student.numel() * student.element_size() if mode == "fwd+bwd" else 0
    _step(loss_fn, student, teacher, mode)  # compile / autotune outside the measurement
    student.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = _step(loss_fn, student, teacher, mode)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - grad_bytes
    ms = triton.testing.do_bench(
        lambda: _step(loss_fn, student, teacher, mode),
        warmup=25,
        rep=max(200, 20 * reps),
        grad_to_none=[student],
        quantiles=[0.5, 0.2, 0.8],
    )
    return {"ms": ms[0], "ms_p20": ms[1], "ms_p80": ms[2], "extra_bytes": max(0, extra), "loss": float(loss)}


def measure(provider, divergence, mode, rows, vocab, dtype, device, reps) -> dict:
    """One measurement; on CPU in a child process so that peak RSS belongs to this provider alone."""
    if device == "cuda":
        return measure_cuda(provider, divergence, mode, rows, vocab, dtype, reps)
    spec = json.dumps([provider, divergence, mode, rows, vocab, str(dtype).removeprefix("torch."), reps])
    proc = subprocess.run(
        [sys.executable, "-m", "bench.logits", "--worker", spec], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{provider} {divergence} {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    provider, divergence, mode, rows, vocab, dtype, reps = json.loads(sys.argv[2])
    print(json.dumps(measure_cpu_in_process(provider, divergence, mode, rows, vocab, getattr(torch, dtype), reps)))
