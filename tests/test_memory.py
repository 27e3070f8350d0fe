"""The chunked PyTorch path's extra memory is bounded by its chunk, however many tokens there are.

Peak RSS is measured in a fresh process (the bench harness's memory worker) with glibc's mmap threshold
pinned, so that RSS follows live memory; "extra" excludes the inputs and the returned gradient.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # four benchmark processes, one at 4096 x 32000 eager


def extra_mib(case: str, provider: str, shape: dict) -> float:
    spec = [case, provider, "forward_kl", "fwd+bwd", shape, "float32", 1, "memory"]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.harness", "--worker", json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["extra_bytes"] / 2**20


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
def test_torch_path_memory_does_not_grow_with_tokens():
    shapes = [{"N": n, "V": 32000} for n in (256, 1024, 4096)]
    ours = [extra_mib("logits", "lit-torch", s) for s in shapes]
    eager = extra_mib("logits", "eager", shapes[-1])
    # The chunk workspace (5 x 1M fp32 elements) plus allocator slack, at every N; eager grows with N.
    assert max(ours) < 48, ours
    assert max(ours) - min(ours) < 12, ours
    assert eager > 10 * max(ours), (eager, ours)
