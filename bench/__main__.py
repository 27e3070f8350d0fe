"""Kernel microbenchmarks: ``python -m bench --help``.

Prints a table, writes a CSV (with the device and versions on every row) and a PNG plot to ``--out``.
The defaults fit the machine: on a CPU, forward KL at N=2048, V=128256, fp32 (a few minutes); on a GPU,
N=8192, V=128256, bf16 with every provider.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import sys
from pathlib import Path

import torch

from . import logits


def _parse(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if cuda else "cpu")
    p.add_argument("--rows", type=int, nargs="+", default=None, help="token counts N (sweep)")
    p.add_argument("--vocab", type=int, nargs="+", default=[128256], help="vocabulary sizes V (sweep)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--divergence", nargs="+", choices=logits.DIVERGENCES, default=["forward_kl"])
    p.add_argument("--providers", nargs="+", choices=logits.PROVIDERS, default=None)
    p.add_argument("--modes", nargs="+", choices=logits.MODES, default=["fwd+bwd", "fwd"])
    p.add_argument("--reps", type=int, default=3, help="timed repetitions on CPU (GPU: do_bench decides)")
    p.add_argument("--out", type=Path, default=Path("bench/out"), help="folder for the CSV and PNG")
    ns = p.parse_args(argv)
    on_gpu = ns.device == "cuda"
    if on_gpu and not cuda:
        p.error("--device cuda but no CUDA device is visible")
    ns.rows = ns.rows or ([8192] if on_gpu else [2048])
    ns.dtype = getattr(torch, ns.dtype or ("bfloat16" if on_gpu else "float32"))
    ns.providers = ns.providers or (list(logits.PROVIDERS) if on_gpu else ["lit-torch", "eager"])
    if not on_gpu and "lit-triton" in ns.providers:
        p.error("lit-triton needs --device cuda (on CPU the Triton interpreter is a test tool, not a backend)")
    return ns


def _environment(device: str) -> dict:
    import triton

    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    return {
        "device": f"{name} ({torch.get_num_threads()} threads)" if device == "cpu" else name,
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
    rows_out = []
    print(f"# {env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}")
    header = (
        f"{'divergence':<11} {'mode':<8} {'N':>6} {'V':>7} {'dtype':<9} {'provider':<11} "
        f"{'ms':>9} {'extra MiB':>10} {'GB/s':>7} {'vs eager':>8} {'|Δloss|':>9}"
    )
    print(header)
    for divergence in ns.divergence:
        for mode in ns.modes:
            for n in ns.rows:
                for v in ns.vocab:
                    results = {}
                    for provider in ns.providers:
                        results[provider] = logits.measure(
                            provider, divergence, mode, n, v, ns.dtype, ns.device, ns.reps
                        )
                    eager = results.get("eager")
                    for provider, r in results.items():
                        gbps = logits.floor_bytes(n, v, ns.dtype, mode) / (r["ms"] * 1e-3) / 1e9
                        row = {
                            "case": "logits",
                            "divergence": divergence,
                            "mode": mode,
                            "N": n,
                            "V": v,
                            "dtype": str(ns.dtype).removeprefix("torch."),
                            "provider": provider,
                            "ms": round(r["ms"], 4),
                            "extra_MiB": round(r["extra_bytes"] / 2**20, 1),
                            "GB_per_s": round(gbps, 1),
                            "speedup_vs_eager": round(eager["ms"] / r["ms"], 2) if eager else "",
                            "abs_loss_diff_vs_eager": f"{abs(r['loss'] - eager['loss']):.2e}" if eager else "",
                            **env,
                        }
                        rows_out.append(row)
                        print(
                            f"{divergence:<11} {mode:<8} {n:>6} {v:>7} {row['dtype']:<9} {provider:<11} "
                            f"{row['ms']:>9.2f} {row['extra_MiB']:>10.1f} {gbps:>7.1f} "
                            f"{row['speedup_vs_eager']!s:>8} {row['abs_loss_diff_vs_eager']:>9}"
                        )
    ns.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    csv_path = ns.out / f"logits-{ns.device}-{stamp}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows_out[0]))
        writer.writeheader()
        writer.writerows(rows_out)
    png_path = _plot(rows_out, ns.out / f"logits-{ns.device}-{stamp}.png", env)
    print(f"wrote {csv_path}" + (f" and {png_path}" if png_path else ""))


def _plot(rows, path: Path, env: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return None
    groups = sorted({(r["divergence"], r["mode"], r["N"], r["V"]) for r in rows})
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(providers)
    for i, provider in enumerate(providers):
        for ax, key in zip(axes, ("ms", "extra_MiB"), strict=True):
            values = [
                next(
                    (
                        r[key]
                        for r in rows
                        if r["provider"] == provider and (r["divergence"], r["mode"], r["N"], r["V"]) == g
                    ),
                    0,
                )
                for g in groups
            ]
            ax.bar([x + i * width for x in range(len(groups))], values, width, label=provider)
    labels = [f"{d}\n{m}\nN={n} V={v}" for d, m, n, v in groups]
    for ax, title in zip(axes, ("time (ms, lower is better)", "extra memory (MiB)"), strict=True):
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], labels, fontsize=8)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"logits-level distillation loss, {rows[0]['dtype']}: {env['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
