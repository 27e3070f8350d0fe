"""Two DDP processes (gloo, CPU) compute what one process computes on the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
needs_distributed = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # each test starts two or three Python processes


def launch(technique: str, devices: int, out: Path, fault: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(HERE / "ddp_worker.py"), technique, str(devices), str(out), fault]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=HERE)


def run(technique: str, devices: int, out: Path, fault: str = "") -> dict:
    proc = launch(technique, devices, out, fault)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


def assert_same_step(single: dict, ddp: dict) -> None:
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    for key, delta in single["delta"].items():
        torch.testing.assert_close(ddp["delta"][key], delta, rtol=1e-4, atol=1e-6, msg=key)
    assert any(bool((d != 0).any()) for d in single["delta"].values())


@needs_distributed
@pytest.mark.parametrize(
    "technique", ["soft", "hard-argmax", "hard-generate", "co", "offline", "on-policy", "on-policy-sampled"]
)
def test_two_processes_equal_one(tmp_path, technique):
    assert_same_step(run(technique, 1, tmp_path / "single.pt"), run(technique, 2, tmp_path / "ddp.pt"))


@needs_distributed
def test_processes_with_sequences_of_different_lengths(tmp_path):
    """A pad-to-longest collator gives the processes different sequence lengths; the step is unchanged."""
    assert_same_step(run("soft", 1, tmp_path / "single.pt"), run("soft", 2, tmp_path / "ddp.pt", "trim"))


@needs_distributed
def test_sample_scores_of_two_processes_are_token_means_over_both(tmp_path):
    """OnPolicyEvaluation on two processes: each continues its own rows with its own seed, and the logged
    metrics are the sums over both processes divided by all their generated tokens."""
    result = run("soft", 2, tmp_path / "ddp.pt", "sample-eval")
    for key, expected in result["reference"].items():
        assert result["metrics"][key] == pytest.approx(expected, rel=1e-5), key
    nll, _, tokens = result["per_process"].T
    assert (tokens > 0).all() and tokens[0] != tokens[1]  # an EOS ends some samples early: unequal token counts,
    mean_of_means = float((nll / tokens).mean())  # so a mean of the processes' means would be another number
    assert mean_of_means != pytest.approx(result["reference"]["val/teacher_nll_of_student"], rel=1e-4)


@needs_distributed
def test_skip_a_nan_on_one_process(tmp_path):
    """The second process's loss is NaN and skipped: the step is the first process's rows alone."""
    single = run("soft", 1, tmp_path / "single.pt", "nan-skip")
    assert_same_step(single, run("soft", 2, tmp_path / "ddp.pt", "nan-skip"))


@needs_distributed
def test_a_nan_on_one_process_stops_both(tmp_path):
    proc = launch("soft", 2, tmp_path / "ddp.pt", "nan-raise")
    assert proc.returncode != 0
    assert "the training loss is nan on at least one process at step 0 (epoch 0, batch 0)" in proc.stderr
    assert not (tmp_path / "ddp.pt").exists()


@needs_distributed
def test_ctrl_c_on_one_process_saves_the_same_step_on_both(tmp_path):
    proc = launch("soft", 2, tmp_path / "ddp.pt", "interrupt")
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert f"Saved a resumable checkpoint at step 1 to {tmp_path / 'interrupted.ckpt'}" in proc.stderr
    assert torch.load(tmp_path / "interrupted.ckpt", weights_only=False)["global_step"] == 1
