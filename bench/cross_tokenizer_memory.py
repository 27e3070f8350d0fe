"""Peak memory of the cross-tokenizer loss from the student's hidden states: ``python -m bench.cross_tokenizer_memory``.

The top-64 boundary term (the module's default) at a large student vocabulary, forward and backward, once with the
student's logits whole (``fused_linear=False``) and once on the fused-linear path (``chunk_size`` tokens at a time),
each in a fresh process: its peak resident memory (Linux's ``VmHWM``, reset once the inputs are built) above what it
held then.
Synthetic inputs (random hidden states, head and teacher logits, a pair at every other position, a random
vocabulary map), since only the shapes matter here. Prints a table and writes ``cross_tokenizer_memory.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
from pathlib import Path

PATHS = ("logits whole", "fused linear")


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))  # kB


def _reset_peak() -> float:
    """Start measuring the peak here: Linux's peak RSS (VmHWM) reset to the current RSS, which is returned. (The
    process's lifetime peak can lie in its imports, above the loss's, so a difference of peaks can read 0.)"""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the lifetime peak, as getrusage gives it (KiB on Linux)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return _status_mib("VmRSS")


def _peak_mib() -> float:
    try:
        return _status_mib("VmHWM")
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(path: str, rows: int, seq_len: int, hidden: int, student_vocab: int, teacher_vocab: int, chunk: int):
    """One path's (peak MiB above the inputs, seconds) in this process."""
    import time

    import numpy as np
    import torch

    from lit_distill.data.cross_tokenizer.fused import fused_cross_tokenizer_loss
    from lit_distill.data.cross_tokenizer.loss import Pairs, cross_tokenizer_loss
    from lit_distill.data.cross_tokenizer.vocab_map import VocabularyMap

    torch.manual_seed(0)
    s = seq_len - 1
    states = torch.randn(rows, s, hidden, requires_grad=True)
    weight = (torch.randn(student_vocab, hidden) / hidden**0.5).requires_grad_()
    teacher = torch.randn(rows, seq_len, teacher_vocab)
    labels = torch.randint(0, student_vocab, (rows, s))
    targets = torch.randint(0, teacher_vocab, (rows, seq_len))
    at = torch.arange(0, s, 2).expand(rows, -1)  # a pair at every other student position
    chunks = torch.full((rows, seq_len), -1)
    pairs = Pairs(at, at, chunks[:, :s], chunks)
    mapping = np.random.default_rng(0).integers(0, student_vocab, teacher_vocab)
    vmap = VocabularyMap(mapping, np.zeros(teacher_vocab, bool), student_vocab, teacher_vocab, "t", "s")
    base = _reset_peak()
    start = time.perf_counter()
    if path == "fused linear":
        out = fused_cross_tokenizer_loss(
            states, weight, None, teacher, labels, targets, pairs, vmap, top_k=64, chunk_size=chunk, alpha=0.5
        )
    else:
        logits = torch.nn.functional.linear(states, weight)
        out = cross_tokenizer_loss(logits, teacher, labels, targets, pairs, vmap, top_k=64, alpha=0.5, teacher_ce=False)
    out.loss.backward()
    return _peak_mib() - base, time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.cross_tokenizer_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--student-vocab", type=int, default=65_536)
    parser.add_argument("--teacher-vocab", type=int, default=4_096)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--one", choices=PATHS, help=argparse.SUPPRESS)  # the child process's path
    ns = parser.parse_args(argv)
    shape = (ns.rows, ns.seq_len, ns.hidden, ns.student_vocab, ns.teacher_vocab, ns.chunk_size)
    if ns.one:
        print(json.dumps(measure(ns.one, *shape)))
        return []
    results = []
    for path in PATHS:
        command = [sys.executable, "-m", "bench.cross_tokenizer_memory", *(argv or sys.argv[1:]), "--one", path]
        mib, seconds = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
        results.append({"path": path, "peak_mib": mib, "seconds": seconds})
    logits_mib = ns.rows * (ns.seq_len - 1) * ns.student_vocab * 4 / 2**20
    print(f"cross-tokenizer loss, top-64: {ns.rows} x {ns.seq_len - 1} tokens, student vocabulary {ns.student_vocab:,}"
          f" (fp32 logits {logits_mib:,.0f} MiB), chunks of {ns.chunk_size}")  # fmt: skip
    print(f"{'path':14s} {'peak MiB':>9s} {'s':>7s}")
    for row in results:
        print(f"{row['path']:14s} {row['peak_mib']:9.0f} {row['seconds']:7.2f}")
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    with open(Path(ns.out) / "cross_tokenizer_memory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "peak_mib", "seconds"])
        writer.writeheader()
        writer.writerows(results)
    return results


if __name__ == "__main__":
    main()
