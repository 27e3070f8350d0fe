"""Test setup: run the Triton kernels under the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before ``lit_distill.kernels.triton_backend`` is imported (the @triton.jit
decorator reads it), and pytest imports this file before any test module. On a machine with a GPU the
compiled kernels are tested instead.
"""

import os
import sys

import pytest
import torch

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


# Files whose every test is slow or multi-process, marked here rather than in the file (they have other owners;
# a module-level ``pytestmark`` there does the same). The other files mark their own tests.
FILE_MARKS = {
    "test_compile.py": pytest.mark.slow,  # compiles every kernel variant for two GPU targets
    "test_cli.py": pytest.mark.slow,  # trains every config a few steps, runs the console script and the demo
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        mark = FILE_MARKS.get(item.path.name)
        if mark is not None:
            item.add_marker(mark)
