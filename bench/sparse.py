"""Sparse teacher (K slots per token) against the dense loss, on the logits: ``python -m bench.sparse``.

Providers, each the mean-over-tokens forward KL at T=1, forward+backward (the student's gradient):
  sparse-torch   sparse_distillation_loss, chunked PyTorch path (top-k targets, tail=False)
  sparse-tail    the same with tail=True (the remaining-mass bucket on both sides)
  dense-torch    distillation_loss on full teacher logits, chunked PyTorch path (the CPU bar's reference)
  sparse-triton  sparse_distillation_loss on the Triton kernels (CUDA only)
  dense-triton   distillation_loss on full teacher logits, Triton kernels (CUDA only: the GPU reference)
Time: the median of ``--reps`` runs after one warm-up, in a fresh process per point. Extra memory: peak RSS
of one step beyond the inputs and the gradient, in another fresh process with glibc's mmap threshold
pinned so that freed buffers leave RSS (see ``bench/harness.py``); on CUDA from ``max_memory_allocated``.
Prints a table and writes ``sparse.csv`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lit_distill import distillation_loss, sparse_distillation_loss

from . import harness

PROVIDERS = ("sparse-torch", "sparse-tail", "dense-torch", "sparse-triton", "dense-triton")


def make_inputs(n: int, vocab: int, k: int, device: str, dtype: torch.dtype = torch.float32):
    """Student logits (with grad) and the dense teacher's logits in ``dtype``, and the teacher's top-K ids and
    (fp32) log-probabilities."""
    gen = torch.Generator(device=device).manual_seed(0)
    student = (torch.randn(n, vocab, generator=gen, device=device) * 2).to(dtype).requires_grad_()
    teacher = torch.randn(n, vocab, generator=gen, device=device) * 2
    logprobs, ids = torch.log_softmax(teacher, -1).topk(k, -1)
    return student, teacher.to(dtype), ids, logprobs


def loss_fn(provider: str, teacher, ids, logprobs):
    backend = "triton" if provider.endswith("-triton") else "torch"
    if provider.startswith("dense"):
        return lambda s: distillation_loss(s, teacher, backend=backend).loss
    tail = provider == "sparse-tail"
    return lambda s: sparse_distillation_loss(s, ids, logprobs, tail=tail, backend=backend).loss


def _step(fn, student):
    student.grad = None
    fn(student).backward()


def run_point(provider: str, n: int, vocab: int, k: int, reps: int, what: str, device: str, dtype: str) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    student, teacher, ids, logprobs = make_inputs(n, vocab, k, device, getattr(torch, dtype))
    if not provider.startswith("dense"):
        del teacher  # not an input of the sparse loss: its memory is not the sparse provider's
        teacher = None
    fn = loss_fn(provider, teacher, ids, logprobs)
    grad_bytes = student.numel() * student.element_size()
    if device == "cuda":
        _step(fn, student)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() - grad_bytes  # the warm-up's gradient is still held
        start = time.perf_counter()
        for _ in range(reps):
            _step(fn, student)
        torch.cuda.synchronize()
        ms = 1e3 * (time.perf_counter() - start) / reps
        return {"ms": ms, "extra_bytes": max(0, torch.cuda.max_memory_allocated() - base - grad_bytes)}
    if what == "memory":
        base = harness._current_rss()
        harness._reset_peak_rss()
        _step(fn, student)
        return {"extra_bytes": max(0, harness._peak_rss() - base - grad_bytes)}
    _step(fn, student)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        _step(fn, student)
        times.append(time.perf_counter() - start)
    return {"ms": 1e3 * statistics.median(times)}


def _worker(spec: list, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sparse", "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sparse", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[2048], help="token counts N")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--slots", type=int, default=64, help="K")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the logits' dtype")
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    ns = p.parse_args(argv)
    providers = ns.providers or (list(PROVIDERS) if ns.device == "cuda" else list(PROVIDERS[:3]))
    ns.out.mkdir(parents=True, exist_ok=True)
    rows, dense_ms = [], {}
    print(f"{'provider':14} {'N':>6} {'V':>7} {'K':>4} {'dtype':>9} {'ms':>9} {'x dense':>8} {'extra MiB':>10}")
    for n in ns.rows:
        for provider in sorted(providers, key=lambda name: name != "dense-torch"):  # the reference first
            spec = [provider, n, ns.vocab, ns.slots, ns.reps]
            timed = _worker([*spec, "time", ns.device, ns.dtype], {})
            memory = (
                timed
                if ns.device == "cuda"
                else _worker([*spec, "memory", ns.device, ns.dtype], {"MALLOC_MMAP_THRESHOLD_": "131072"})
            )
            if provider == "dense-torch":
                dense_ms[n] = timed["ms"]
            ratio = timed["ms"] / dense_ms[n] if n in dense_ms else float("nan")
            row = {
                "provider": provider,
                "N": n,
                "V": ns.vocab,
                "K": ns.slots,
                "dtype": ns.dtype,
                "device": ns.device,
                "threads": os.cpu_count(),
                "ms": round(timed["ms"], 2),
                "ratio_to_dense": round(ratio, 3),
                "extra_bytes": memory["extra_bytes"],
            }
            rows.append(row)
            print(
                f"{provider:14} {n:>6} {ns.vocab:>7} {ns.slots:>4} {ns.dtype:>9} {timed['ms']:>9.2f} {ratio:>8.3f}"
                f" {memory['extra_bytes'] / 2**20:>10.1f}"
            )
    with open(ns.out / "sparse.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(run_point(*json.loads(sys.argv[2]))))
    else:
        sys.exit(main())
