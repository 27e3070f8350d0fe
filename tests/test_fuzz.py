"""Property-based tests (hypothesis) of both backends against the float64 oracle, and gradcheck."""

import math

import pytest
import torch
from helpers import TOLERANCES, assert_grad_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import oracle

from lit_distill.kernels import DIVERGENCES, distillation_loss

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def cases(draw):
    rows = draw(st.integers(1, 6))
    vocab = draw(st.integers(2, 1500))  # past one 1024-column gradient block at the top
    padding = draw(st.sampled_from([0, 0, 3, 64]))
    divergence = draw(st.sampled_from(DIVERGENCES))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.5, 2.0, 6.0]))
    student = torch.randn(rows, vocab + padding, generator=gen) * scale
    teacher = 0.7 * student + torch.randn(rows, vocab + padding, generator=gen) * scale
    if draw(st.booleans()):  # a few huge logits
        spots = torch.rand(rows, vocab + padding, generator=gen) < 0.01
        student = torch.where(spots, 1e4 * torch.sign(student), student)
    skew = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9]))
    infinite = divergence == "reverse_kl" or (divergence == "skew_reverse_kl" and skew == 0)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    if not infinite and draw(st.booleans()):  # banned tokens (KL(q || p) would be +inf)
        banned = torch.rand(rows, vocab + padding, generator=gen) < 0.2
        banned[torch.arange(rows), labels] = False  # the teacher allows the true token (finite teacher CE)
        teacher = teacher.masked_fill(banned, -math.inf)
    labels[torch.rand(rows, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = -100
    options = {
        "divergence": divergence,
        "beta": draw(st.sampled_from([0.1, 0.5, 0.9])),
        "skew": skew,
        "temperature": draw(st.sampled_from([0.7, 1.0, 2.5])),
        "alpha": draw(st.sampled_from([0.0, 0.35, 1.0])),
        "hard_labels": draw(st.sampled_from(["labels", "teacher_argmax"])),
        "teacher_ce_weight": draw(st.sampled_from([0.0, 0.4])),
        "reduction": draw(st.sampled_from(["mean", "sum"])),
        "vocab_size": vocab if padding else None,
    }
    return student.to(dtype), teacher.to(dtype), labels, options


def check_against_oracle(student, teacher, labels, options, backend):
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    out = distillation_loss(s, t, labels, backend=backend, **options)
    out.loss.backward()
    s64 = student.double().requires_grad_()
    t64 = teacher.double().requires_grad_()
    kw = dict(options)
    kw["divergence_name"] = kw.pop("divergence")
    ref, _ = oracle(s64, t64, labels, **kw)
    ref.backward()
    huge = bool((student.float().abs() > 1e3).any())
    loss_rtol, grad_rtol = TOLERANCES[student.dtype]
    if huge:  # fp32 log-probs of 1e4 logits carry ~1e-3 absolute rounding
        loss_rtol, grad_rtol = 1e-3, max(grad_rtol, 1e-2)
    assert math.isfinite(out.loss.item())
    torch.testing.assert_close(out.loss.detach().double(), ref.detach(), rtol=loss_rtol, atol=1e-3 if huge else 1e-5)
    # softmax - onehot at a probability near 1 cancels: fp32 keeps it to ~1e-7 absolute (times the mean's 1/N).
    atol = 2e-7 / (max(1, int((labels != -100).sum())) if options["reduction"] == "mean" else 1)
    assert_grad_close(s.grad, s64.grad, grad_rtol, "student gradient", atol=atol)
    assert_grad_close(t.grad, t64.grad, grad_rtol, "teacher gradient", atol=atol)


@FUZZ
@given(cases())
def test_fuzz_torch_backend(case):
    check_against_oracle(*case, backend="torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only on machines without a GPU")
@settings(
    max_examples=80, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(cases())
def test_fuzz_triton_interpreter(case):
    check_against_oracle(*case, backend="triton")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_student(divergence, reduction):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    labels = torch.tensor([1, -100, 4])

    def loss(s):
        return distillation_loss(
            s,
            teacher,
            labels,
            divergence=divergence,
            beta=0.3,
            skew=0.2,
            alpha=0.6,
            temperature=1.7,
            reduction=reduction,
            backend="torch",
        ).loss

    assert torch.autograd.gradcheck(loss, (student,))


def test_gradcheck_teacher_through_its_cross_entropy():
    # The soft term treats the teacher as a constant, so check the teacher with the soft weight at 0.
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(4, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 8, -100, 3])

    def loss(s, t):
        return distillation_loss(s, t, labels, alpha=0.0, teacher_ce_weight=0.7, backend="torch").loss

    assert torch.autograd.gradcheck(loss, (student, teacher))
