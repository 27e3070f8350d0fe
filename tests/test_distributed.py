"""Two DDP processes (gloo, CPU) compute what one process computes on the same global batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def run(technique: str, devices: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "ddp_worker.py"), technique, str(devices), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=HERE,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("technique", ["soft", "hard-argmax", "co"])
def test_two_processes_equal_one(tmp_path, technique):
    single = run(technique, 1, tmp_path / "single.pt")
    ddp = run(technique, 2, tmp_path / "ddp.pt")
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)
    for key, delta in single["delta"].items():
        torch.testing.assert_close(ddp["delta"][key], delta, rtol=1e-4, atol=1e-6, msg=key)
    assert any(bool((d != 0).any()) for d in single["delta"].values())
