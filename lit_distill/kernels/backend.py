"""Choosing the Triton or the PyTorch backend for given tensors, without importing the kernels.

Importing ``triton_backend`` decorates the kernels, and the decoration fixes whether they are compiled or run
by Triton's CPU interpreter (``TRITON_INTERPRET``). So the choice is made from Triton's own setting, or, once
the kernels exist, from how they were made; only the caller that runs them imports them.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

#: Where the Triton kernels live; looked up in ``sys.modules``, never imported from here.
TRITON_BACKEND_MODULE = f"{__package__}.triton_backend"


def triton_available() -> bool:
    """Whether the Triton package can be imported here (it is only installed on Linux)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    """Whether Triton's setting (``TRITON_INTERPRET`` or ``triton.knobs``) asks for the CPU interpreter now."""
    try:
        from triton import knobs
    except ImportError:  # Triton before 3.4 reads the variable itself, and only "1" turns it on
        return os.environ.get("TRITON_INTERPRET", "0") == "1"
    return bool(knobs.runtime.interpret)


def kernels_interpreted() -> bool:
    """Whether the Triton kernels run under the CPU interpreter: as they were decorated if they already were,
    else as Triton's current setting will decorate them."""
    kernels = sys.modules.get(TRITON_BACKEND_MODULE)
    if kernels is not None:
        return kernels.INTERPRETED
    return interpreter_requested()


def use_triton(backend: str, tensor: torch.Tensor) -> bool:
    """Resolve ``backend`` for tensors on ``tensor``'s device; a clear error where Triton cannot run."""
    if backend == "torch":
        return False
    if backend == "auto":
        return tensor.is_cuda and triton_available()
    if backend != "triton":
        raise ValueError(f"unknown backend {backend!r}; choose one of 'auto', 'triton', 'torch'")
    if not triton_available():
        raise ValueError("backend='triton' needs the triton package; install it or use backend='torch'")
    if tensor.is_cuda or kernels_interpreted():
        return True
    hint = (
        f" (TRITON_INTERPRET=1 is set, but only after {TRITON_BACKEND_MODULE} was imported;"
        " set it before the first Triton call)"
        if interpreter_requested()
        else ""
    )
    raise ValueError(
        f"backend='triton' on {tensor.device} tensors needs CUDA tensors, or Triton's CPU interpreter"
        f" (TRITON_INTERPRET=1 in the environment before the kernels are first used){hint};"
        " use backend='torch' or 'auto' on CPU"
    )
