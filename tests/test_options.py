"""The loss keywords are written once (options.py) and every entry point still shows all of them."""

import ast
import copy
import inspect
import os
import pickle
import subprocess
import sys
import typing
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from lit_distill import DistillationLoss, distillation_loss, fused_linear_distillation_loss
from lit_distill.kernels import DIVERGENCES
from lit_distill.kernels.options import DIVERGENCE_CODES, LOSS_KEYWORDS, LossOptions

KERNELS = Path(__file__).resolve().parents[1] / "lit_distill" / "kernels"
ENTRY_POINTS = {
    "distillation_loss": distillation_loss,
    "fused_linear_distillation_loss": fused_linear_distillation_loss,
    "DistillationLoss": DistillationLoss,
}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_every_keyword_is_an_explicit_parameter_with_its_default_and_type(name):
    entry = ENTRY_POINTS[name]
    params = inspect.signature(entry).parameters
    hints = typing.get_type_hints(entry.__init__ if isinstance(entry, type) else entry)
    types = typing.get_type_hints(LossOptions)
    for f in fields(LossOptions):
        assert params[f.name].default == f.default
        assert hints[f.name] == types[f.name]
        assert params[f.name].kind is (
            inspect.Parameter.POSITIONAL_OR_KEYWORD if isinstance(entry, type) else inspect.Parameter.KEYWORD_ONLY
        )
        assert f"    {f.name}: " in entry.__doc__, f"{name}'s docstring lacks {f.name}"
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert "**options" not in entry.__doc__


def test_the_public_signatures_are_unchanged():
    keywords = (
        "divergence: str = 'forward_kl', beta: float = 0.5, skew: float = 0.1, temperature: float = 1.0,"
        " t2_scaling: bool = True, alpha: float = 1.0, hard_labels: str = 'labels', label_weight: float = 0.0,"
        " teacher_ce_weight: float = 0.0,"
        " vocab_size: int | None = None, ignore_index: int = -100, reduction: str = 'mean', backend: str = 'auto'"
    )
    assert str(inspect.signature(distillation_loss)) == (
        "(student_logits: 'torch.Tensor', teacher_logits: 'torch.Tensor', labels: 'torch.Tensor | None' = None, *,"
        f" {keywords}) -> 'DistillationOutput'"
    )
    assert str(inspect.signature(DistillationLoss)) == f"({keywords}) -> 'None'"


def test_a_misspelled_keyword_is_a_type_error_naming_the_function():
    with pytest.raises(TypeError, match=r"distillation_loss\(\) got an unexpected keyword argument 'temprature'"):
        distillation_loss(torch.randn(2, 5), torch.randn(2, 5), temprature=2.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        DistillationLoss(temprature=2.0)


def test_loss_module_holds_plain_attributes_validated_at_the_next_call():
    loss = DistillationLoss("jsd", 0.3, temperature=2.0)  # positional, as before
    assert (loss.divergence, loss.beta, loss.temperature, loss.vocab_size, loss.ignore_index) == (
        "jsd",
        0.3,
        2.0,
        None,
        -100,
    )
    assert "beta=0.3" in repr(loss) and "backend='auto'" in repr(loss)
    loss.alpha = 1.5  # what a buggy schedule could do: accepted now, refused at the next call
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\], got 1.5"):
        loss(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([0, 1]))
    loss.alpha = 0.5
    assert loss(torch.randn(2, 5), torch.randn(2, 5), torch.tensor([0, 1])).loss.isfinite()
    for clone in (copy.deepcopy(loss), pickle.loads(pickle.dumps(loss))):
        assert clone.options() == loss.options()
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        DistillationLoss(backend="cuda")


def test_options_are_normalized_and_resolved():
    opts = LossOptions(temperature=torch.tensor(2), beta=1, t2_scaling=0, divergence="jsd")
    assert opts.temperature == 2.0 and type(opts.temperature) is float and opts.t2_scaling is False
    assert (opts.resolved_divergence, opts.mix, opts.soft_scale) == ("reverse_kl", 0.0, 1.0)
    assert LossOptions(divergence="skew_reverse_kl", skew=0.25).mix == 0.25
    assert LOSS_KEYWORDS[0] == "divergence" and LOSS_KEYWORDS[-1] == "backend"


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (1.5, ValueError, r"label_weight must lie in \[0, 1\], got 1.5"),
        (-0.1, ValueError, r"label_weight must lie in \[0, 1\], got -0.1"),
        (float("nan"), ValueError, r"label_weight must lie in \[0, 1\], got nan"),
        ("0.5", TypeError, "label_weight must be a number, got str"),
    ],
)
def test_label_weight_is_validated(value, error, match):
    with pytest.raises(error, match=match):
        LossOptions(label_weight=value)
    with pytest.raises(error, match=match):
        DistillationLoss(hard_labels="teacher_argmax", label_weight=value)


def test_label_weight_mixes_only_into_an_argmax_hard_term():
    def resolved(**kw):
        opts = LossOptions(**kw)
        return opts.argmax_target, opts.label_mix

    assert resolved(hard_labels="teacher_argmax") == (True, 0.0)
    assert resolved(hard_labels="teacher_argmax", label_weight=0.3) == (True, 0.3)
    assert resolved(hard_labels="teacher_argmax", label_weight=1) == (False, 0.0)  # the argmax term left out
    assert resolved(label_weight=0.3) == (False, 0.0)  # both terms on the labels: one cross-entropy
    student, teacher = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(
        ValueError,
        match=r"label_weight=0.5 mixes a cross-entropy on labels into the hard term, but labels is None; pass labels"
        r" or set label_weight=0",
    ):
        distillation_loss(student, teacher, None, alpha=0.5, hard_labels="teacher_argmax", label_weight=0.5)
    # without a hard term (alpha=1) there is nothing to mix: no labels needed
    distillation_loss(student, teacher, None, hard_labels="teacher_argmax", label_weight=0.5)


def test_divergence_codes_are_positions_in_the_one_table():
    assert list(DIVERGENCE_CODES) == list(DIVERGENCES)
    assert [DIVERGENCE_CODES[d] for d in DIVERGENCES] == list(range(len(DIVERGENCES)))


def _kernel_imports(path: Path) -> set[str]:
    """The sibling modules of lit_distill/kernels that ``path`` imports, at any depth of the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
    return found


def test_no_two_kernel_files_import_each_other():
    modules = {p.stem: _kernel_imports(p) for p in KERNELS.glob("*.py") if p.stem != "__init__"}
    for name, imported in modules.items():
        for other in imported:
            assert name not in modules.get(other, set()), f"{name}.py and {other}.py import each other"
    assert "triton_backend" not in modules["backend"]


def test_importing_the_kernels_imports_neither_lightning_nor_triton():
    code = (
        "import sys, lit_distill.kernels\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'pytorch_lightning', 'triton'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr


def test_triton_interpret_set_after_the_kernels_were_made_is_named():
    pytest.importorskip("triton", reason="Triton is not installed on this platform")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import os, torch\n"
        "import lit_distill.kernels.triton_backend\n"
        "from lit_distill import distillation_loss\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    distillation_loss(torch.randn(2, 8), torch.randn(2, 8), backend='triton')\n"
        "except ValueError as e:\n"
        "    print('ERROR:', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "TRITON_INTERPRET=1 is set, but only after lit_distill.kernels.triton_backend was imported" in out.stdout, (
        out.stdout + out.stderr
    )
