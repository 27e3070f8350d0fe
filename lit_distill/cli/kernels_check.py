"""``lit-distill kernels``: the loss and its gradient on random logits, Triton kernels beside PyTorch.

A check that the kernels run and agree on this machine. It needs neither Lightning nor a model, so it has a
plain argparse parser of its own instead of LightningCLI's, and it asks for the Triton interpreter
(``TRITON_INTERPRET=1``) where there is no CUDA device.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

DTYPES = ("float32", "bfloat16", "float16")


def kernels_main(args: list[str]) -> None:
    """Run ``lit-distill kernels`` with ``args`` (the options after ``kernels``) and print the table."""
    kernels_check(kernels_parser().parse_args(args))


def kernels_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lit-distill kernels",
        description="Loss and gradients of every divergence on random logits, Triton kernels vs PyTorch.",
    )
    p.add_argument("--rows", type=int, default=8, help="tokens (rows of logits); default 8")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size; default 32000")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="logits dtype; default float32")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature; default 2.0")
    p.add_argument("--alpha", type=float, default=0.5, help="soft-term weight; default 0.5")
    p.add_argument("--seed", type=int, default=0)
    return p


def kernels_check(ns: argparse.Namespace) -> None:
    """Print the loss of every divergence on random logits, per backend, with the gradients' largest gap."""
    if ns.rows <= 0 or ns.vocab <= 1:
        sys.exit("lit-distill kernels: --rows must be positive and --vocab at least 2")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        # Must precede the first Triton call, which imports (and decorates) the kernels.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # The interpreter evaluates masked lanes too (-inf - -inf); the kernels discard those with where().
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    from lit_distill.kernels import DIVERGENCES, distillation_loss, triton_available

    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, ns.dtype)
    gen = torch.Generator().manual_seed(ns.seed)
    student = (torch.randn(ns.rows, ns.vocab, generator=gen) * 2).to(device, dtype)
    teacher = (0.8 * student.float().cpu() + 1.2 * torch.randn(ns.rows, ns.vocab, generator=gen)).to(device, dtype)
    labels = torch.randint(0, ns.vocab, (ns.rows,), generator=gen).to(device)
    labels[0] = -100  # one ignored position
    backends = ["triton", "torch"] if triton_available() else ["torch"]
    where = "CUDA" if cuda else "CPU, Triton interpreter"
    print(
        f"lit-distill kernels: {ns.rows} tokens x {ns.vocab} vocab, {ns.dtype}, T={ns.temperature}, "
        f"alpha={ns.alpha}, device {device} ({where})"
    )
    if len(backends) == 1:
        print("Triton is not installed here: showing the PyTorch backend only.")
    header = f"{'divergence':<16}" + "".join(f"{f'loss [{b}]':>16}" for b in backends)
    header += f"{'max |dgrad|':>14}" if len(backends) == 2 else ""
    header += "".join(f"{f'ms [{b}]':>13}" for b in backends)
    print(header)
    print("-" * len(header))
    for divergence in DIVERGENCES:
        losses, grads, times = [], [], []
        for backend in backends:
            s = student.detach().clone().requires_grad_()
            start = time.perf_counter()
            out = distillation_loss(
                s, teacher, labels, divergence=divergence, temperature=ns.temperature, alpha=ns.alpha, backend=backend
            )
            out.loss.backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - start))
            losses.append(out.loss.item())
            grads.append(s.grad.float())
        row = f"{divergence:<16}" + "".join(f"{x:>16.6f}" for x in losses)
        if len(backends) == 2:
            row += f"{(grads[0] - grads[1]).abs().max().item():>14.2e}"
        row += "".join(f"{t:>13.1f}" for t in times)
        print(row)
