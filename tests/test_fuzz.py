"""Property-based tests (hypothesis) of both backends against the float64 oracle, and gradcheck."""

import math

import pytest
import torch
from helpers import TOLERANCES, assert_grad_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import oracle

from lit_distill.kernels import DIVERGENCES, distillation_loss, fused_linear_distillation_loss

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
        "label_weight": draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])),  # mixes only with hard_labels="teacher_argmax"
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


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only on machines without a GPU")
@settings(
    max_examples=80, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(cases())
def test_fuzz_triton_interpreter(case):
    check_against_oracle(*case, backend="triton")


# ----------------------------------------------------------------------------------- fused linear
LINEAR_NAMES = ("student hidden", "student weight", "student bias", "teacher hidden", "teacher weight", "teacher bias")


@st.composite
def linear_cases(draw):
    """Hidden states, lm_head weights and biases of a student and a teacher of different widths, possibly padded
    heads of different sizes, labels with ignored positions, a chunk size and the loss options."""
    lead = draw(st.sampled_from([(1,), (5,), (12,), (2, 3), (3, 4)]))
    h_s, h_t = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    vocab = draw(st.integers(2, 1500))
    pad_s, pad_t = (draw(st.sampled_from([0, 0, 3, 64])) for _ in range(2))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.5, 2.0, 6.0]))  # the logits' size
    hidden_s = torch.randn(*lead, h_s, generator=gen)
    hidden_t = torch.randn(*lead, h_t, generator=gen)
    weight_s = torch.randn(vocab + pad_s, h_s, generator=gen) * scale / math.sqrt(h_s)
    weight_t = torch.randn(vocab + pad_t, h_t, generator=gen) * scale / math.sqrt(h_t)
    bias_s = torch.randn(vocab + pad_s, generator=gen) if draw(st.booleans()) else None
    bias_t = torch.randn(vocab + pad_t, generator=gen) if draw(st.booleans()) else None
    labels = torch.randint(0, vocab, lead, generator=gen)
    labels[torch.rand(lead, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = -100
    options = {
        "divergence": draw(st.sampled_from(DIVERGENCES)),
        "beta": draw(st.sampled_from([0.1, 0.5, 0.9])),
        "skew": draw(st.sampled_from([0.0, 0.1, 0.5, 0.9])),
        "temperature": draw(st.sampled_from([0.7, 1.0, 2.5])),
        "alpha": draw(st.sampled_from([0.0, 0.35, 1.0])),
        "hard_labels": draw(st.sampled_from(["labels", "teacher_argmax"])),
        "teacher_ce_weight": draw(st.sampled_from([0.0, 0.4])),
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "vocab_size": vocab if pad_s or pad_t else None,
        "chunk_size": draw(st.sampled_from([None, 1, 2, 3, 5, 16])),
        "label_weight": draw(st.sampled_from([0.0, 0.0, 0.3, 1.0])),
    }
    return (hidden_s, weight_s, bias_s, hidden_t, weight_t, bias_t), labels, options


def check_linear_against_oracle(tensors, labels, options, backend):
    """The fused loss and its six gradients against the oracle on explicit float64 ``hidden @ weight.T + bias``."""
    leaves = [None if x is None else x.clone().requires_grad_() for x in tensors]
    h_s, w_s, b_s, h_t, w_t, b_t = leaves
    out = fused_linear_distillation_loss(
        h_s, w_s, h_t, w_t, labels, student_bias=b_s, teacher_bias=b_t, backend=backend, **options
    )
    # reduction="none": weight the rows unevenly, so that each row's gradient is checked on its own scale.
    row_weights = torch.linspace(0.5, 2.0, labels.numel()).reshape(labels.shape)
    (out.loss * row_weights if options["reduction"] == "none" else out.loss).sum().backward()

    reference = [None if x is None else x.double().requires_grad_() for x in tensors]
    r_hs, r_ws, r_bs, r_ht, r_wt, r_bt = reference
    logits_s = r_hs @ r_ws.T + (0 if r_bs is None else r_bs)
    logits_t = r_ht @ r_wt.T + (0 if r_bt is None else r_bt)
    kw = {k: v for k, v in options.items() if k != "chunk_size"}
    kw["divergence_name"] = kw.pop("divergence")
    ref, _ = oracle(logits_s, logits_t, labels, **kw)
    (ref * row_weights.double() if options["reduction"] == "none" else ref).sum().backward()

    loss_rtol, grad_rtol = 1e-4, 2e-4  # float32 projections round the logits (the oracle's are exact)
    assert torch.isfinite(out.loss).all()
    torch.testing.assert_close(out.loss.detach().double(), ref.detach(), rtol=loss_rtol, atol=1e-5)
    counted = max(1, int((labels != -100).sum())) if options["reduction"] == "mean" else 1
    for name, got, want in zip(LINEAR_NAMES, leaves, reference, strict=True):
        if want is not None:
            assert_grad_close(got.grad, want.grad, grad_rtol, name, atol=1e-6 / counted)


FUZZ_LINEAR = settings(
    max_examples=100, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@FUZZ_LINEAR
@given(linear_cases())
def test_fuzz_fused_linear_torch_backend(case):
    check_linear_against_oracle(*case, backend="torch")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only on machines without a GPU")
@settings(FUZZ_LINEAR, max_examples=40)
@given(linear_cases())
def test_fuzz_fused_linear_triton_interpreter(case):
    check_linear_against_oracle(*case, backend="triton")


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
