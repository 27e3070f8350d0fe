"""The benchmark harness runs at a tiny size, writes its CSV, and its providers agree on the loss."""

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["provider"] for r in rows} == {"lit-torch", "eager"}
    assert {r["case"] for r in rows} == {"logits", "fused_linear"}
    assert len(rows) == 2 * 2 * 2 * 2  # cases x divergences x modes x providers
    for r in rows:
        assert float(r["ms"]) > 0 and float(r["rate"]) > 0 and r["device"] and r["torch"]
        assert float(r["abs_loss_diff_vs_eager"]) < 1e-4  # same math as the eager baseline
