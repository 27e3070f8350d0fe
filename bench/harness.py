"""Measuring one (case, provider, divergence, mode, shape) point: time, extra memory, loss.

Timing: GPU, the median (and 20th/80th percentiles) of ``triton.testing.do_bench``; CPU, the median wall
time of ``reps`` runs after one warm-up. Memory: extra bytes beyond the inputs and the gradient buffers
that every provider must return; GPU, from ``max_memory_allocated``; CPU, from the peak RSS of one step in
a fresh process, with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``) so that freed buffers go
back to the OS and RSS follows live memory rather than the heap's high-water mark. The CPU timing runs in
another fresh process with the default allocator, since pinning the threshold adds page faults.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from . import fused_linear, logits

CASES = {"logits": logits, "fused_linear": fused_linear}
MODES = ("fwd", "fwd+bwd")


def measure(case: str, provider: str, divergence: str, mode: str, shape: dict, dtype, device: str, reps: int) -> dict:
    """Returns ``{"ms", "extra_bytes", "loss"}`` (and percentiles on GPU)."""
    if device == "cuda":
        return _measure_cuda(case, provider, divergence, mode, shape, dtype, reps)
    spec = [case, provider, divergence, mode, shape, str(dtype).removeprefix("torch."), reps]
    timed = _worker([*spec, "time"], {})
    memory = _worker([*spec, "memory"], {"MALLOC_MMAP_THRESHOLD_": "131072"})
    return {**timed, "extra_bytes": memory["extra_bytes"]}


def _worker(spec: list, env: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.harness", "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **env},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, spec[:4]))} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _step(loss_fn, inputs, grads, mode):
    if mode == "fwd":
        with torch.no_grad():
            return loss_fn(*inputs)
    for x in grads:
        x.grad = None
    loss = loss_fn(*inputs)
    loss.backward()
    return loss


def _grad_bytes(grads, mode) -> int:
    return sum(x.numel() * x.element_size() for x in grads) if mode == "fwd+bwd" else 0


def _measure_cpu_in_process(case, provider, divergence, mode, shape, dtype, reps, what) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    module = CASES[case]
    inputs, grads = module.make_inputs(shape, dtype, "cpu")
    loss_fn = module.make_loss_fn(provider, divergence)
    if what == "memory":
        base_rss = _current_rss()
        _reset_peak_rss()
        _step(loss_fn, inputs, grads, mode)
        return {"extra_bytes": max(0, _peak_rss() - base_rss - _grad_bytes(grads, mode))}
    loss = _step(loss_fn, inputs, grads, mode)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        _step(loss_fn, inputs, grads, mode)
        times.append(time.perf_counter() - start)
    return {"ms": 1e3 * statistics.median(times), "loss": float(loss.detach())}


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Forget the peak so far (imports, input creation): Linux resets VmHWM on writing 5 to clear_refs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak includes earlier transients, an overestimate


def _peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def _measure_cuda(case, provider, divergence, mode, shape, dtype, reps) -> dict:
    import triton.testing

    module = CASES[case]
    inputs, grads = module.make_inputs(shape, dtype, "cuda")
    loss_fn = module.make_loss_fn(provider, divergence)
    _step(loss_fn, inputs, grads, mode)  # compilation and autotuning outside the measurement
    for x in grads:
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = _step(loss_fn, inputs, grads, mode)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - _grad_bytes(grads, mode)
    ms = triton.testing.do_bench(
        lambda: _step(loss_fn, inputs, grads, mode),
        warmup=25,
        rep=max(200, 20 * reps),
        grad_to_none=grads,
        quantiles=[0.5, 0.2, 0.8],
    )
    return {"ms": ms[0], "ms_p20": ms[1], "ms_p80": ms[2], "extra_bytes": max(0, extra), "loss": float(loss.detach())}


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    case, provider, divergence, mode, shape, dtype, reps, what = json.loads(sys.argv[2])
    result = _measure_cpu_in_process(case, provider, divergence, mode, shape, getattr(torch, dtype), reps, what)
    print(json.dumps(result))
