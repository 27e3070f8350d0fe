"""Every bad input gets a ValueError/TypeError that names the argument."""

import os
import subprocess
import sys

import pytest
import torch

from lit_distill import distillation_loss

S = torch.randn(4, 50)
T = torch.randn(4, 50)
Y = torch.randint(0, 50, (4,))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"teacher_logits": torch.randn(5, 50)},
            ValueError,
            r"student_logits \(4, 50\) and teacher_logits \(5, 50\) must have the same leading shape",
        ),
        (
            {"teacher_logits": torch.randn(4, 64)},
            ValueError,
            "student vocabulary size 50 differs from teacher vocabulary size 64",
        ),
        ({"teacher_logits": torch.randn(4, 64), "vocab_size": 60}, ValueError, "vocab_size=60 is larger"),
        ({"vocab_size": 0}, ValueError, "vocab_size must be positive"),
        ({"vocab_size": 3.0}, TypeError, "vocab_size must be an int"),
        ({"divergence": "kl"}, ValueError, "unknown divergence 'kl'"),
        ({"reduction": "avg"}, ValueError, "unknown reduction"),
        ({"backend": "cuda"}, ValueError, "unknown backend"),
        ({"hard_labels": "argmax"}, ValueError, "unknown hard_labels"),
        ({"divergence": "jsd", "beta": 1.5}, ValueError, r"beta must lie in \[0, 1\]"),
        ({"skew": -0.1}, ValueError, r"skew must lie in \[0, 1\]"),
        ({"temperature": 0.0}, ValueError, "temperature must be a finite number > 0"),
        ({"temperature": float("inf")}, ValueError, "temperature must be a finite number > 0"),
        ({"alpha": 1.01}, ValueError, r"alpha must lie in \[0, 1\]"),
        ({"alpha": "half"}, TypeError, "alpha must be a number"),
        ({"teacher_ce_weight": -1.0}, ValueError, "teacher_ce_weight must be a finite number >= 0"),
        (
            {"student_logits": torch.randint(0, 5, (4, 50))},
            TypeError,
            "student_logits must be floating point",
        ),
        (
            {"teacher_logits": torch.randint(0, 5, (4, 50))},
            TypeError,
            "teacher_logits must be floating point",
        ),
        ({"student_logits": S.numpy()}, TypeError, "student_logits must be a torch.Tensor"),
        ({"labels": Y.float()}, TypeError, "labels must be an integer tensor"),
        ({"labels": Y[:3]}, ValueError, r"labels shape \(3,\) must equal"),
        (
            {"labels": None, "alpha": 0.5},
            ValueError,
            "alpha=0.5 < 1 mixes in a hard-label loss, but labels is None",
        ),
        ({"labels": None, "teacher_ce_weight": 0.1}, ValueError, "teacher_ce_weight > 0 .* labels is None"),
        ({"labels": torch.tensor([0, 1, 50, 2])}, ValueError, r"label 50 is outside \[0, 50\)"),
        ({"labels": torch.tensor([0, -1, 3, 2])}, ValueError, r"label -1 is outside \[0, 50\)"),
        ({"student_logits": torch.randn(4, 0), "teacher_logits": torch.randn(4, 0)}, ValueError, "V > 0"),
    ],
)
def test_bad_input_is_named(kwargs, error, match):
    args = {"student_logits": S, "teacher_logits": T, "labels": Y, **kwargs}
    with pytest.raises(error, match=match):
        distillation_loss(args.pop("student_logits"), args.pop("teacher_logits"), args.pop("labels"), **args)


def test_labels_past_vocab_size_are_rejected():
    with pytest.raises(ValueError, match=r"label 45 is outside \[0, 40\)"):
        distillation_loss(S, T, torch.tensor([0, 45, 1, 2]), vocab_size=40)


def test_ignore_index_is_not_a_range_error():
    out = distillation_loss(S, T, torch.tensor([0, -100, 1, 2]), alpha=0.5)
    assert out.num_tokens.item() == 3


def run_without_interpreter(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter without TRITON_INTERPRET, as a user's script would run."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_triton_backend_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch\n"
        "from lit_distill import distillation_loss\n"
        "try:\n"
        "    distillation_loss(torch.randn(2, 8), torch.randn(2, 8), backend='triton')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    out = run_without_interpreter(code)
    message = out.stdout.strip()
    assert message.startswith("backend='triton' on cpu tensors needs CUDA tensors"), out.stdout + out.stderr
    assert message.endswith("; use backend='torch' or 'auto' on CPU"), message


def test_import_and_a_cpu_loss_import_no_triton():
    """Without a GPU or the interpreter, importing the package and computing a loss on CPU leave Triton alone
    (the kernels import it when a Triton call is made)."""
    code = (
        "import sys, torch, lit_distill\n"
        "out = lit_distill.distillation_loss(torch.randn(3, 10), torch.randn(3, 10))\n"
        "print('triton' in sys.modules, float(out.loss) >= 0)\n"
    )
    out = run_without_interpreter(code)
    assert out.stdout.strip() == "False True", out.stdout + out.stderr
