"""Test setup: run the Triton kernels under the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before ``lit_distill.kernels.triton_backend`` is imported (the @triton.jit
decorator reads it), and pytest imports this file before any test module. On a machine with a GPU the
compiled kernels are tested instead.
"""

import os
import sys

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the cores: one torch thread each (and their children)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # for `import oracle`

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
requires_interpreter = pytest.mark.skipif(
    HAS_CUDA, reason="the Triton CPU interpreter is only enabled on machines without a GPU"
)

# (backend, device) pairs every correctness test runs on.
BACKENDS = [
    pytest.param(("torch", "cpu"), id="torch-cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpreter", marks=[pytest.mark.slow, requires_interpreter]),
    pytest.param(("torch", "cuda"), id="torch-cuda", marks=[pytest.mark.gpu, requires_cuda]),
    pytest.param(("triton", "cuda"), id="triton-cuda", marks=[pytest.mark.gpu, requires_cuda]),
]


@pytest.fixture(params=BACKENDS)
def backend_device(request):
    return request.param
