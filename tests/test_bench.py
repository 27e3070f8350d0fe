"""The benchmarks: the harness at a tiny size (its CSV, its providers agree on the loss), the launch-config
sweep under the Triton interpreter, bench/gpu_check.sh (static checks, and its --dry-run on a CPU), and the chat
data preparation benchmark at a tiny size."""

import csv
import itertools
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import logits, sweep

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
interpreted = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the sweep runs on CPU tensors under the Triton interpreter (tests/conftest.py turns it on without a GPU)",
)


@pytest.mark.slow  # trains the demo's BPE (about 9 s) in a subprocess
def test_chat_data_bench_counts_the_same_tokens_cold_cached_and_by_either_span_path(tmp_path):
    env = {**os.environ, "LIT_DISTILL_CACHE": str(tmp_path / "cache"), "HF_DATASETS_CACHE": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "bench.chat_data", "--conversations", "40", "--num-proc", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = tmp_path.glob("chat_data-*.csv")
    rows = list(csv.DictReader(path.open()))
    assert [(r["template"], r["run"]) for r in rows] == [
        ("markers", "cold"),
        ("markers", "cached"),
        ("prefixes", "cold"),
        ("prefixes", "cached"),
    ]
    # Both templates render the same text, so both span paths see the same ids and learn the same tokens.
    assert {r["conversations"] for r in rows} == {"40"}
    assert len({r["tokens"] for r in rows}) == 1 and len({r["counted tokens"] for r in rows}) == 1
    assert all(float(r["seconds"]) > 0 and int(r["tokens_per_s"]) > 0 for r in rows)


@pytest.mark.slow  # a subprocess that measures 16 configurations
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


# ------------------------------------------------------------------------------------------ the sweep
ROW, GRAD = [(128, 4), (256, 8, 64)], [(64, 4), (128, 2)]


def fake_timer(step, grads):
    """Times nothing: asks the (replaced) launch_config what is in force, runs the step, and makes the
    smallest blocks the fastest."""
    cfg = sweep.kernels().launch_config(300)
    fake_timer.seen.append(cfg)
    step()
    return cfg["row_block"] / 100 + cfg["grad_block"], None, None


@interpreted
def test_sweep_times_each_config_with_it_in_force():
    original = sweep.kernels().launch_config
    (student, teacher), _ = logits.make_inputs({"N": 2, "V": 300}, torch.float32, "cpu")
    fake_timer.seen = []
    s = sweep.Sweep(student, teacher, fake_timer)
    sweep.run(s, "forward_kl", ROW, GRAD, also=["reverse_kl"])
    assert sweep.kernels().launch_config is original  # restored
    row0, grad0 = s.default["row_block"], s.default["grad_block"]  # 512 and 512 at V=300 when this was written
    assert [(r["divergence"], r["mode"], r["config"], r["row_block"], r["grad_block"]) for r in s.rows] == [
        ("forward_kl", "fwd+bwd", "default", row0, grad0),
        ("forward_kl", "fwd", "default", row0, ""),
        ("forward_kl", "fwd", "row", 128, ""),
        ("forward_kl", "fwd+bwd", "row", 128, grad0),
        ("forward_kl", "fwd", "row", 256, ""),
        ("forward_kl", "fwd+bwd", "row", 256, grad0),
        ("forward_kl", "fwd+bwd", "grad", row0, 64),
        ("forward_kl", "fwd+bwd", "grad", row0, 128),
        ("forward_kl", "fwd+bwd", "best", 128, 64),  # the fastest forward's row, the fastest gradient config
        ("reverse_kl", "fwd+bwd", "default", row0, grad0),
        ("reverse_kl", "fwd", "default", row0, ""),
        ("reverse_kl", "fwd+bwd", "best", 128, 64),
        ("reverse_kl", "fwd", "best", 128, ""),
    ]
    for r, cfg in zip(s.rows, fake_timer.seen, strict=True):  # what was in force while each row was timed
        assert (r["row_block"], r["row_warps"]) == (cfg["row_block"], cfg["row_warps"])
        if "row_registers" in cfg:  # the kernels' register cap, where they have one
            assert r["row_registers"] == ("-" if cfg["row_registers"] is None else cfg["row_registers"])
        if r["mode"] == "fwd+bwd":
            assert (r["grad_block"], r["grad_warps"]) == (cfg["grad_block"], cfg["grad_warps"])
        assert not r["error"]
        assert float(r["abs_loss_diff_vs_default"]) < 1e-5  # fp32: only the summation order differs
        assert r["mode"] == "fwd" or float(r["grad_rel_diff_vs_default"]) < 1e-5
    if "row_registers" in s.default:
        assert [r["row_registers"] for r in s.rows[2:6]] == ["-", "-", 64, 64]
    report = sweep.report(s, "forward_kl")
    assert report[0].startswith("best forward_kl fwd+bwd: row 128x4, grad 64x4:")
    assert report[2].startswith("best pair forward_kl fwd+bwd: row 128x4, grad 64x4:")


@interpreted
def test_forced_config_is_what_the_kernels_look_up():
    (student, teacher), _ = logits.make_inputs({"N": 2, "V": 300}, torch.float32, "cpu")
    expected = sweep.make_step(student, teacher, "forward_kl", "fwd+bwd")()
    with sweep.forced_config((128, 4), (64, 4)) as calls:
        cfg = sweep.kernels().launch_config(300)
        calls.clear()
        loss = sweep.make_step(student, teacher, "forward_kl", "fwd+bwd")()
    assert cfg["row_block"] == 128 and cfg["grad_block"] == 64
    assert calls and set(calls) == {300}  # the statistics and gradient passes asked for V
    torch.testing.assert_close(loss, expected)


@interpreted
def test_sweep_reports_a_config_the_kernels_ignore(monkeypatch):
    (student, teacher), _ = logits.make_inputs({"N": 2, "V": 300}, torch.float32, "cpu")
    s = sweep.Sweep(student, teacher, sweep.cpu_timer(1))
    s.measure("forward_kl", "fwd+bwd", label="default")
    monkeypatch.setattr(sweep, "make_step", lambda *args: lambda: student.sum())  # never calls launch_config
    row = s.measure("forward_kl", "fwd", row=(128, 4))
    assert "launch_config was never called" in row["error"] and row["ms"] == ""


@interpreted
def test_sweep_command_writes_its_csv(tmp_path, capsys):
    args = ["--device", "cpu", "--rows", "2", "--vocab", "300", "--row-configs", "128x4", "--grad-configs", "64x4"]
    sweep.main([*args, "--reps", "1", "--also", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("sweep-cpu-*.csv")
    rows = list(csv.DictReader(path.open()))
    default = sweep.kernels().launch_config(300)
    row0, grad0 = str(default["row_block"]), str(default["grad_block"])
    assert [(r["mode"], r["config"], r["row_block"], r["grad_block"]) for r in rows][:5] == [
        ("fwd+bwd", "default", row0, grad0),
        ("fwd", "default", row0, ""),
        ("fwd", "row", "128", ""),
        ("fwd+bwd", "row", "128", grad0),
        ("fwd+bwd", "grad", row0, "64"),
    ]
    assert len(rows) in (5, 6)  # and the best pair when it is not the default
    assert all(float(r["ms"]) > 0 and r["N"] == "2" and r["V"] == "300" and not r["error"] for r in rows)
    assert "best forward_kl fwd+bwd: row " in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ gpu_check.sh
def test_gpu_check_script_is_valid_bash_with_python3_and_timeouts():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"(^|[\s;&|(])python\s", code, re.M), "the GPU machine may have python3 only"
    assert "python3 -m pytest" in code and "python3 -m bench.sweep" in code and "python3 -m bench " in code
    # Every command that runs tests or benchmarks goes through `step` (under timeout) or has its own timeout.
    assert 'timeout -k 10 "$lim" "$@"' in code
    for line in code.splitlines():
        if re.search(r"python3 -m (pytest|bench)", line) and "timeout" not in line:
            assert line.lstrip().startswith("step "), line


@pytest.mark.slow  # about a minute: every step of the GPU check at tiny sizes, tests collected and skipped
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU stand-in for a GPU machine")
def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("TRITON_INTERPRET", None)  # the script's commands set what they need
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    names = ["imports", "collect", "tests-0", "tests-1", "sweep", "bench-logits", "bench-fused"]
    names += ["bench-sparse", "bench-compile-logits", "bench-compile-fused"]
    assert sorted(s[0] for s in steps) == sorted(names)
    assert all(s[3] == "ok" for s in steps), steps
    summary = (tmp_path / "SUMMARY.md").read_text()
    for heading in ("## Steps", "## GPU tests", "## Launch-config sweep", "## Benchmarks", "Wall time: "):
        assert heading in summary
    assert re.search(r"\| \*\*all\*\* \|  \| (\d+) \|", summary)  # every GPU test skipped on a CPU
    assert "best forward_kl fwd+bwd: row " in summary and "| logits | forward_kl | fwd | N=8 V=300 |" in summary
    assert "## Sparse-teacher loss" in summary and "sparse-torch" in summary.split("## Sparse-teacher loss")[1]
    assert list(tmp_path.glob("sweep/sweep-cpu-*.csv")) and len(list(tmp_path.glob("bench-*/bench-cpu-*.csv"))) == 4


@pytest.mark.slow  # two subprocesses, each importing torch
def test_cross_tokenizer_memory_bench_finds_the_fused_path_lighter(tmp_path):
    """The fused path never holds the student's whole logits (here 63.5 MiB in fp32), the logits path holds them
    and their gradient: its peak is far above the fused path's."""
    from bench import cross_tokenizer_memory

    args = ["--rows", "8", "--student-vocab", "16384", "--chunk-size", "128", "--out", str(tmp_path)]
    whole, fused = cross_tokenizer_memory.main(args)
    assert (whole["path"], fused["path"]) == ("logits whole", "fused linear")
    assert whole["peak_mib"] > 2 * 63.5 and fused["peak_mib"] < whole["peak_mib"] / 2
    with open(tmp_path / "cross_tokenizer_memory.csv") as f:
        assert [row["path"] for row in csv.DictReader(f)] == ["logits whole", "fused linear"]
