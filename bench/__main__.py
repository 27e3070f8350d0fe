"""Kernel microbenchmarks: ``python -m bench --help``.

Cases: ``logits`` (the loss over materialized logits) and ``fused_linear`` (from hidden states and lm_head
weights). Prints a table, writes a CSV (device and versions on every row) and a PNG plot to ``--out``.
Defaults fit the machine: on a CPU, forward KL at N=2048, V=128256 (logits) and N=1024, H=512, V=128256
(fused linear) in fp32, a few minutes; on a GPU, N=8192, V=128256 and H=4096 in bf16 with every provider.
The CSV is written row by row, so a run cut short keeps what it measured; a provider that fails is reported
and the run goes on (exit status 1 at the end).

Related: ``python3 -m bench.sweep`` times the Triton kernels' block sizes and warps (bench/sweep.py), and
``bash bench/gpu_check.sh`` runs the GPU tests, that sweep and these benchmarks in one time-boxed call.
``python -m bench.chat_data`` times preparing chat data (rendering, masking, tokenizing) cold and from the cache.
``python -m bench.data_loading`` measures corpora larger than memory: training's peak RSS on a large and a small
prepared corpus, preparing and reading speed, and ``lit-distill fit``'s start-up with and without a prepared corpus.
``python -m bench.cross_tokenizer`` times the cross-tokenizer collator and loss against soft-label distillation, and
``python -m bench.cross_tokenizer_memory`` the loss's peak memory with the student's logits whole and fused.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import platform
import sys
from pathlib import Path

import torch

from . import harness

CPU_SHAPES = {"logits": {"N": 2048, "V": 128256}, "fused_linear": {"N": 1024, "H": 512, "V": 128256}}
GPU_SHAPES = {"logits": {"N": 8192, "V": 128256}, "fused_linear": {"N": 8192, "H": 4096, "V": 128256}}


def _parse(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--case", nargs="+", choices=list(harness.CASES), default=list(harness.CASES))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    p.add_argument("--rows", type=int, nargs="+", default=None, help="token counts N to sweep")
    p.add_argument("--vocab", type=int, nargs="+", default=None, help="vocabulary sizes V to sweep")
    p.add_argument("--hidden", type=int, nargs="+", default=None, help="hidden sizes H to sweep (fused_linear)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--divergence", nargs="+", choices=["forward_kl", "reverse_kl", "jsd"], default=["forward_kl"])
    p.add_argument("--providers", nargs="+", choices=["lit-triton", "lit-torch", "eager", "compile", "liger"])
    p.add_argument("--modes", nargs="+", choices=harness.MODES, default=["fwd+bwd", "fwd"])
    p.add_argument("--reps", type=int, default=3, help="timed repetitions on CPU (GPU: do_bench decides)")
    p.add_argument("--out", type=Path, default=Path("bench/out"), help="folder for the CSV and PNG")
    ns = p.parse_args(argv)
    if ns.device == "cuda" and not cuda:
        p.error("--device cuda but no CUDA device is visible")
    on_gpu = ns.device == "cuda"
    ns.dtype = getattr(torch, ns.dtype or ("bfloat16" if on_gpu else "float32"))
    ns.providers = ns.providers or (
        ["lit-triton", "lit-torch", "eager", "compile", "liger"] if on_gpu else ["lit-torch", "eager"]
    )
    return ns


def _shapes(case: str, ns) -> list[dict]:
    base = (GPU_SHAPES if ns.device == "cuda" else CPU_SHAPES)[case]
    shapes = [dict(base)]
    for key, values in (("N", ns.rows), ("V", ns.vocab), ("H", ns.hidden)):
        if values and key in base:
            shapes = [{**s, key: v} for s in shapes for v in values]
    return shapes


def _skip_reason(provider: str, case: str, divergence: str, device: str) -> str | None:
    if provider in ("lit-triton", "liger") and device != "cuda":
        return f"{provider} runs on CUDA only"
    if provider == "liger" and importlib.util.find_spec("liger_kernel") is None:
        return "liger_kernel is not installed"
    if provider == "liger" and case == "fused_linear" and divergence != "forward_kl":
        return "the Liger fused-linear provider is compared on forward_kl (beta=0) only"
    return None


def _environment(device: str) -> dict:
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv=None) -> None:
    ns = _parse(argv)
    env = _environment(ns.device)
    rows_out, skipped, failed = [], set(), []
    ns.out.mkdir(parents=True, exist_ok=True)
    stem = ns.out / f"bench-{ns.device}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    csv_file, writer = stem.with_suffix(".csv").open("w", newline=""), None
    print(f"# {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}", flush=True)
    print(
        f"{'case':<12} {'divergence':<11} {'mode':<8} {'shape':<22} {'provider':<11} {'ms':>9} "
        f"{'extra MiB':>10} {'rate':>14} {'vs eager':>8} {'|Δloss|':>9}",
        flush=True,
    )
    for case, divergence, mode, shape in _points(ns):
        module = harness.CASES[case]
        results = {}
        for provider in ns.providers:
            reason = _skip_reason(provider, case, divergence, ns.device)
            if reason:
                skipped.add(f"{provider} ({case}): {reason}")
                continue
            try:
                results[provider] = harness.measure(
                    case, provider, divergence, mode, shape, ns.dtype, ns.device, ns.reps
                )
            except Exception as error:  # one provider that fails (a compiler, out of memory) must not end the run
                failed.append(f"{case} {divergence} {mode} {provider}: {type(error).__name__}: {error}")
                print(f"FAILED {failed[-1]}", file=sys.stderr, flush=True)
                if ns.device == "cuda":
                    torch.cuda.empty_cache()
        eager = results.get("eager")
        for provider, r in results.items():
            row = _row(case, divergence, mode, shape, ns.dtype, provider, r, eager, module, env)
            rows_out.append(row)
            if writer is None:
                writer = csv.DictWriter(csv_file, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
            csv_file.flush()  # row by row: a run cut short by a time limit keeps what it measured
            print(
                f"{case:<12} {divergence:<11} {mode:<8} {row['shape']:<22} {provider:<11} "
                f"{r['ms']:>9.2f} {row['extra_MiB']:>10.1f} {row['rate']:>9.1f} {module.RATE_UNIT:<4} "
                f"{row['speedup_vs_eager']!s:>8} {row['abs_loss_diff_vs_eager']:>9}",
                flush=True,
            )
    csv_file.close()
    for note in sorted(skipped):
        print(f"skipped: {note}")
    if not rows_out:
        stem.with_suffix(".csv").unlink()
        sys.exit("nothing was measured")
    png = _plot(rows_out, stem.with_suffix(".png"), env)
    print(f"wrote {stem.with_suffix('.csv')}" + (f" and {png}" if png else ""))
    if failed:
        sys.exit(f"{len(failed)} measurements failed:\n" + "\n".join(failed))


def _points(ns):
    """(case, divergence, mode, shape) in the order they are measured."""
    for case in ns.case:
        for divergence in ns.divergence:
            for mode in ns.modes:
                for shape in _shapes(case, ns):
                    yield case, divergence, mode, shape


def _row(case, divergence, mode, shape, dtype, provider, r, eager, module, env) -> dict:
    return {
        "case": case,
        "divergence": divergence,
        "mode": mode,
        "shape": " ".join(f"{k}={v}" for k, v in shape.items()),
        "dtype": str(dtype).removeprefix("torch."),
        "provider": provider,
        "ms": round(r["ms"], 4),
        "extra_MiB": round(r["extra_bytes"] / 2**20, 1),
        "rate": round(module.work(shape, dtype, mode) / (r["ms"] * 1e-3), 2),
        "rate_unit": module.RATE_UNIT,
        "speedup_vs_eager": round(eager["ms"] / r["ms"], 2) if eager else "",
        "abs_loss_diff_vs_eager": f"{abs(r['loss'] - eager['loss']):.2e}" if eager else "",
        **env,
    }


def _plot(rows, path: Path, env: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -c constraints.txt matplotlib): no plot", file=sys.stderr)
        return None
    groups = list(dict.fromkeys((r["case"], r["divergence"], r["mode"], r["shape"]) for r in rows))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 3 * len(groups)), 5))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        for ax, key in zip(axes, ("ms", "extra_MiB"), strict=True):
            values = [
                next(
                    (
                        r[key]
                        for r in rows
                        if r["provider"] == provider and (r["case"], r["divergence"], r["mode"], r["shape"]) == g
                    ),
                    0,
                )
                for g in groups
            ]
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=provider)
    labels = ["\n".join(g) for g in groups]
    for ax, title in zip(axes, ("time (ms, lower is better)", "extra memory (MiB)"), strict=True):
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], labels, fontsize=7)
        ax.set_title(title)
        ax.set_yscale("log")
        ax.legend()
    fig.suptitle(f"lit-distill kernels, {rows[0]['dtype']}: {env['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
