"""Block size and warps sweep of the Triton statistics (row) and gradient kernels.

``python3 -m bench.sweep --out DIR`` (``--help`` for the options). At one shape (on a GPU: forward KL,
N=8192, V=128256, bf16) it times ``distillation_loss(..., backend="triton")`` with
``triton_backend.launch_config`` replaced by a function that returns the default configuration with the
row pass's (BLOCK, warps, register cap) and the gradient pass's (BLOCK, warps) under test, and restores it
afterwards. The forward runs the row pass only and the backward the gradient pass only, so they are swept
one at a time:

1. the default configuration, forward+backward then forward (its loss and gradient are the reference);
2. every row config, forward and forward+backward (with the default gradient config);
3. every gradient config, forward+backward (with the default row config);
4. the best pair (the fastest forward's row config, the fastest step-3 gradient config), forward+backward;
5. each ``--also`` divergence (default: reverse_kl) at the default and at that best pair.

A row config is ``BLOCKxWARPS`` (no register cap) or ``BLOCKxWARPSxREGISTERS`` (the ``maxnreg`` cap that
``launch_config``'s ``row_registers`` sets, where the kernels have it). Timing: on a GPU the median (and
20th/80th percentiles) of ``triton.testing.do_bench``; on a CPU, where the kernels run under
``TRITON_INTERPRET`` (for tests), the median wall time of ``--reps`` runs. Every row also says how far its
loss and gradient are from the default configuration's, so a configuration that computes something else
shows. Prints a table and the best configurations, and writes ``sweep-<device>-<time>.csv`` to ``--out`` row
by row (a run cut short keeps what it measured). Each configuration compiles its kernel once, a few seconds
on a GPU: the default sweep takes about a minute.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

# (BLOCK, warps, register cap or None); each block and warps with and without the default's cap of 64.
ROW_CONFIGS = tuple((b, w, r) for b, w in ((2048, 8), (4096, 8), (4096, 16), (8192, 16)) for r in (None, 64))
GRAD_CONFIGS = ((1024, 4), (2048, 8), (4096, 8))
FIELDS = (
    "divergence", "mode", "config", "row_block", "row_warps", "row_registers", "grad_block", "grad_warps", "ms",
    "ms_p20", "ms_p80", "loss", "abs_loss_diff_vs_default", "grad_rel_diff_vs_default", "error", "N", "V",
    "dtype", "device", "torch", "triton",
)  # fmt: skip
KEYS = ("row_block", "row_warps", "grad_block", "grad_warps")  # what launch_config must return


def kernels():
    """The Triton backend, imported late: on a CPU, TRITON_INTERPRET must be set before its first import."""
    return importlib.import_module("lit_distill.kernels.triton_backend")


@contextlib.contextmanager
def forced_config(row: tuple | None = None, grad: tuple[int, int] | None = None):
    """Within the block, ``triton_backend.launch_config`` returns its default with the row pass's
    ``(BLOCK, warps[, register cap])`` and the gradient pass's ``(BLOCK, warps)`` replaced where given (other
    keys kept; the register cap only where the default has one, ``None`` for none).

    Yields the list of vocabulary sizes the replacement was asked for; the original is restored on exit.
    """
    module = kernels()
    default = module.launch_config
    calls: list[int] = []

    def launch_config(vocab: int) -> dict:
        calls.append(vocab)
        cfg = dict(default(vocab))
        missing = [key for key in KEYS if key not in cfg]
        if missing:
            raise KeyError(f"launch_config no longer returns {missing}: the sweep cannot set them")
        if row is not None:
            cfg.update(row_block=row[0], row_warps=row[1])
            if "row_registers" in cfg:
                cfg["row_registers"] = row[2] if len(row) > 2 else None
        if grad is not None:
            cfg.update(grad_block=grad[0], grad_warps=grad[1])
        return cfg

    module.launch_config = launch_config
    try:
        yield calls
    finally:
        module.launch_config = default


def make_step(student: torch.Tensor, teacher: torch.Tensor, divergence: str, mode: str):
    """One forward (``"fwd"``, no autograd) or forward+backward (``"fwd+bwd"``) of the Triton loss."""
    from lit_distill.kernels import distillation_loss

    def step() -> torch.Tensor:
        if mode == "fwd":
            with torch.no_grad():
                return distillation_loss(student, teacher, divergence=divergence, backend="triton").loss
        student.grad = None
        loss = distillation_loss(student, teacher, divergence=divergence, backend="triton").loss
        loss.backward()
        return loss

    return step


def cuda_timer(step, grads: list[torch.Tensor]) -> tuple[float, float | None, float | None]:
    import triton.testing

    median, p20, p80 = triton.testing.do_bench(step, grad_to_none=grads, quantiles=[0.5, 0.2, 0.8])
    return median, p20, p80


def cpu_timer(reps: int):
    def timer(step, grads) -> tuple[float, float | None, float | None]:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times), None, None

    return timer


class Sweep:
    """Measures configurations on one pair of inputs and writes each result as a CSV row when it has it."""

    def __init__(self, student, teacher, timer, writer=None, env: dict | None = None):
        self.student, self.teacher, self.timer = student, teacher, timer
        self.writer, self.env = writer, env or {}
        self.vocab = student.shape[1]
        self.default = dict(kernels().launch_config(self.vocab))
        self.reference: dict[str, tuple[float, torch.Tensor]] = {}  # divergence -> default's (loss, gradient)
        self.rows: list[dict] = []

    def measure(self, divergence: str, mode: str, row=None, grad=None, label: str = "default") -> dict:
        """Time one configuration (``None``: the default's) and compare its loss and gradient with the default's."""
        result = {"divergence": divergence, "mode": mode, "config": label, **self._config(row, grad, mode)}
        try:
            with forced_config(row, grad) as calls:
                step = make_step(self.student, self.teacher, divergence, mode)
                loss = float(step().detach())  # compiles this configuration before the timing
                result.update(self._compare(divergence, mode, loss))
                ms, p20, p80 = self.timer(step, [self.student])
            if self.vocab not in calls:
                raise RuntimeError(
                    "triton_backend.launch_config was never called: the kernels no longer read it, so the sweep "
                    "would time the default configuration"
                )
            result.update(ms=round(ms, 4), ms_p20=_round(p20), ms_p80=_round(p80), loss=loss)
        except Exception as error:  # one configuration that fails to compile or run must not end the sweep
            result["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        finally:
            self.student.grad = None
        row_out = {**{k: "" for k in FIELDS}, **result, **self.env}
        self.rows.append(row_out)
        if self.writer is not None:
            self.writer(row_out)
        print(_format(row_out), flush=True)
        return row_out

    def _config(self, row, grad, mode) -> dict:
        d = self.default
        if row is None:
            row = (d["row_block"], d["row_warps"], d.get("row_registers"))
        cfg = {"row_block": row[0], "row_warps": row[1]}
        if "row_registers" in d:
            cfg["row_registers"] = row[2] if len(row) > 2 and row[2] is not None else "-"
        if mode == "fwd+bwd":  # the forward never runs the gradient kernel
            grad = grad or (d["grad_block"], d["grad_warps"])
            cfg.update(grad_block=grad[0], grad_warps=grad[1])
        return cfg

    def _compare(self, divergence: str, mode: str, loss: float) -> dict:
        gradient = self.student.grad.detach() if mode == "fwd+bwd" else None
        if divergence not in self.reference:
            if gradient is None:
                raise RuntimeError("measure the default forward+backward first: it is the reference")
            self.reference[divergence] = (loss, gradient.clone())
        ref_loss, ref_grad = self.reference[divergence]
        out = {"abs_loss_diff_vs_default": f"{abs(loss - ref_loss):.2e}"}
        if gradient is not None:
            scale = ref_grad.abs().max().float().clamp_min(torch.finfo(torch.float32).tiny)
            diff = (gradient - ref_grad).abs().max().float()  # in the gradient dtype: no fp32 copies of [N, V]
            out["grad_rel_diff_vs_default"] = f"{float(diff / scale):.2e}"
        return out

    def best(self, divergence: str, mode: str, labels=None) -> dict | None:
        """The fastest measured row for ``divergence`` and ``mode`` (among ``labels`` when given)."""
        rows = [
            r
            for r in self.rows
            if r["divergence"] == divergence and r["mode"] == mode and r["ms"] != ""
            if labels is None or r["config"] in labels
        ]
        return min(rows, key=lambda r: r["ms"], default=None)


def run(sweep: Sweep, divergence: str, row_configs, grad_configs, also=("reverse_kl",)) -> None:
    """Steps 1 to 5 of the module docstring."""
    sweep.measure(divergence, "fwd+bwd")
    sweep.measure(divergence, "fwd")
    for row in row_configs:
        sweep.measure(divergence, "fwd", row=row, label="row")
        sweep.measure(divergence, "fwd+bwd", row=row, label="row")
    for grad in grad_configs:
        sweep.measure(divergence, "fwd+bwd", grad=grad, label="grad")
    fastest_row = sweep.best(divergence, "fwd", labels=("default", "row"))
    fastest_grad = sweep.best(divergence, "fwd+bwd", labels=("default", "grad"))
    row = _row_of(fastest_row) if fastest_row and fastest_row["config"] == "row" else None
    grad = _grad_of(fastest_grad) if fastest_grad and fastest_grad["config"] == "grad" else None
    pairs = [(None, None, "default")]
    if row or grad:
        sweep.measure(divergence, "fwd+bwd", row=row, grad=grad, label="best")
        pairs.append((row, grad, "best"))
    for other in also:
        for row, grad, label in pairs:
            sweep.measure(other, "fwd+bwd", row=row, grad=grad, label=label)
            sweep.measure(other, "fwd", row=row, grad=grad, label=label)


def _row_of(r: dict) -> tuple:
    registers = r["row_registers"]
    return r["row_block"], r["row_warps"], None if registers in ("", "-") else registers


def _grad_of(r: dict) -> tuple[int, int]:
    return r["grad_block"], r["grad_warps"]


def report(sweep: Sweep, divergence: str) -> list[str]:
    """The fastest configurations against the default, one line each (``best ...``)."""
    lines = []
    for mode in ("fwd+bwd", "fwd"):
        best = sweep.best(divergence, mode)
        default = sweep.best(divergence, mode, labels=("default",))
        if best is None:
            lines.append(f"best {divergence} {mode}: nothing was measured")
            continue
        line = f"best {divergence} {mode}: {_config_text(best, mode)}: {best['ms']:.3f} ms"
        if default is not None:
            speedup = default["ms"] / best["ms"]
            line += f" (default {_config_text(default, mode)}: {default['ms']:.3f} ms; {speedup:.2f}x)"
        lines.append(line)
    pair = sweep.best(divergence, "fwd+bwd", labels=("best",))
    if pair is not None:
        lines.append(f"best pair {divergence} fwd+bwd: {_config_text(pair, 'fwd+bwd')}: {pair['ms']:.3f} ms")
    return lines


def _config_text(r: dict, mode: str) -> str:
    registers = f"x{r['row_registers']}" if r["row_registers"] not in ("", "-") else ""
    text = f"row {r['row_block']}x{r['row_warps']}{registers}"
    return text + (f", grad {r['grad_block']}x{r['grad_warps']}" if mode == "fwd+bwd" else "")


def _round(x):
    return "" if x is None else round(x, 4)


HEADER = (
    f"{'divergence':<11} {'mode':<8} {'config':<8} {'row':>11} {'grad':>9} {'ms':>9} {'p20':>9} {'p80':>9} "
    f"{'|Δloss|':>9} {'grad rel':>9}"
)


def _format(r: dict) -> str:
    row = _config_text(r, "fwd").removeprefix("row ")
    grad = f"{r['grad_block']}x{r['grad_warps']}" if r["grad_block"] != "" else "-"
    start = f"{r['divergence']:<11} {r['mode']:<8} {r['config']:<8} {row:>11} {grad:>9}"
    if r["error"]:
        return f"{start} FAILED {r['error']}"
    return (
        f"{start} {r['ms']:>9.3f} {r['ms_p20']!s:>9} {r['ms_p80']!s:>9} {r['abs_loss_diff_vs_default']:>9} "
        f"{r['grad_rel_diff_vs_default'] or '-':>9}"
    )


def _config(text: str, parts: tuple[int, ...]) -> tuple:
    try:
        values = tuple(int(x) for x in text.lower().split("x"))
        if len(values) not in parts:
            raise ValueError
    except ValueError:
        form = "BLOCKxWARPS[xREGISTERS] such as 4096x8 or 4096x8x64" if 3 in parts else "BLOCKxWARPS such as 1024x4"
        raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}") from None
    return values if len(values) == 2 or values[2] else (*values[:2], None)


def _row_config(text: str) -> tuple:
    return _config(text, (2, 3))


def _grad_config(text: str) -> tuple:
    return _config(text, (2,))


def _parse(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python3 -m bench.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/out"), help="folder for the CSV")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    p.add_argument("--rows", type=int, default=None, help="tokens N (GPU 8192, CPU 4)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary V (GPU 128256, CPU 300)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--divergence", choices=["forward_kl", "reverse_kl", "jsd"], default="forward_kl")
    p.add_argument("--also", nargs="*", default=["reverse_kl"], help="divergences timed at the default and best")
    p.add_argument("--row-configs", nargs="+", type=_row_config, default=list(ROW_CONFIGS), metavar="BxW[xR]")
    p.add_argument("--grad-configs", nargs="+", type=_grad_config, default=list(GRAD_CONFIGS), metavar="BxW")
    p.add_argument("--reps", type=int, default=3, help="timed runs on CPU (GPU: do_bench decides)")
    ns = p.parse_args(argv)
    if ns.device == "cuda" and not cuda:
        p.error("--device cuda but no CUDA device is visible")
    on_gpu = ns.device == "cuda"
    ns.rows = ns.rows or (8192 if on_gpu else 4)
    ns.vocab = ns.vocab or (128256 if on_gpu else 300)
    ns.dtype = getattr(torch, ns.dtype or ("bfloat16" if on_gpu else "float32"))
    return ns


def main(argv=None) -> None:
    ns = _parse(argv)
    if ns.device == "cpu":  # the kernels run under the interpreter; it must be on before they are defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton

    from .logits import make_inputs

    (student, teacher), _ = make_inputs({"N": ns.rows, "V": ns.vocab}, ns.dtype, ns.device)
    name = torch.cuda.get_device_name() if ns.device == "cuda" else "cpu (Triton interpreter)"
    env = {"N": ns.rows, "V": ns.vocab, "dtype": str(ns.dtype).removeprefix("torch."), "device": name,
           "torch": torch.__version__, "triton": triton.__version__}  # fmt: skip
    timer = cuda_timer if ns.device == "cuda" else cpu_timer(ns.reps)
    ns.out.mkdir(parents=True, exist_ok=True)
    path = ns.out / f"sweep-{ns.device}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}.csv"
    print(f"# {name}, torch {torch.__version__}, triton {triton.__version__}, N={ns.rows} V={ns.vocab} {env['dtype']}")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()

        def write(row: dict) -> None:
            writer.writerow(row)
            f.flush()

        sweep = Sweep(student, teacher, timer, write, env)
        print(f"default launch_config({ns.vocab}): {sweep.default}")
        print(HEADER, flush=True)
        run(sweep, ns.divergence, ns.row_configs, ns.grad_configs, ns.also)
    for line in report(sweep, ns.divergence):
        print(line)
    print(f"wrote {path}")
    failed = [r for r in sweep.rows if r["error"]]
    if failed:
        sys.exit(f"{len(failed)} of {len(sweep.rows)} configurations failed (the error column of {path})")


if __name__ == "__main__":
    main()
