"""The benchmark harness runs at a tiny size, writes its CSV, and its providers agree on the loss."""

import csv
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a subprocess that measures 16 configurations


def test_bench_cpu_smoke(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "--rows",
        "32",
        "--vocab",
        "3000",
        "--hidden",
        "48",
        "--reps",
        "1",
        "--out",
        str(tmp_path),
        "--divergence",
        "forward_kl",
        "jsd",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (csv_path,) = tmp_path.glob("bench-cpu-*.csv")
    assert list(tmp_path.glob("bench-cpu-*.png"))
    assert_rows(list(csv.DictReader(csv_path.open())))


def assert_rows(rows: list[dict]) -> None:
    groups = list(itertools.product(["logits", "fused_linear"], ["forward_kl", "jsd"], ["fwd+bwd", "fwd"]))
    assert sorted((r["case"], r["divergence"], r["mode"], r["provider"]) for r in rows) == sorted(
        (*group, provider) for group in groups for provider in ("lit-torch", "eager")
    )
    by_key = {(r["case"], r["divergence"], r["mode"], r["provider"]): r for r in rows}
    for r in rows:
        assert r["shape"] == SHAPES[r["case"]] and r["dtype"] == "float32" and r["device"] and r["torch"]
        ms, extra = float(r["ms"]), float(r["extra_MiB"])
        assert math.isfinite(ms) and ms > 0 and math.isfinite(extra) and extra >= 0, r
        # The rates and speedups are rounded to 2 decimals (a tiny run's rates round to 0): check what they
        # were computed from instead.
        assert r["rate_unit"] == UNITS[r["case"]]
        assert float(r["rate"]) == pytest.approx(work(r["case"], r["mode"]) / (ms * 1e-3), rel=1e-3, abs=0.006), r
        eager_ms = float(by_key[r["case"], r["divergence"], r["mode"], "eager"]["ms"])
        assert float(r["speedup_vs_eager"]) == pytest.approx(eager_ms / ms, rel=1e-3, abs=0.006), r
        assert float(r["abs_loss_diff_vs_eager"]) < 1e-4  # same math as the eager baseline


SHAPES = {"logits": "N=32 V=3000", "fused_linear": "N=32 H=48 V=3000"}
UNITS = {"logits": "GB/s", "fused_linear": "TFLOP/s"}


def work(case: str, mode: str) -> float:
    """The numerator of the rate as bench/logits.py and bench/fused_linear.py define it, at the shapes above."""
    n, h, v = 32, 48, 3000
    if case == "logits":  # GB a two-pass design moves in float32: read both rows twice, write the gradient
        return (2 if mode == "fwd" else 5) * n * v * 4 / 1e9
    return (2 * n * (h + h) * v + (4 * n * h * v if mode == "fwd+bwd" else 0)) / 1e12  # projection TFLOP
