"""distillation_loss on both backends against the float64 oracle: every option, loss and gradients."""

import math

import pytest
import torch
from helpers import TOLERANCES, assert_grad_close
from oracle import oracle

from lit_distill import DistillationLoss, distillation_loss
from lit_distill.kernels import DIVERGENCES

N_ROWS = (2, 3)  # leading shape: 6 rows
VOCAB = 5003  # not a power of two, more than one 4096-column block
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf - inf inside the interpreter


def make_logits(shape=N_ROWS, vocab=VOCAB, teacher_vocab=None, dtype=torch.float32, seed=0, scale=2.0):
    """Correlated student/teacher logits rounded to ``dtype`` (the oracle then sees the same values)."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(*shape, vocab, generator=gen) * scale
    teacher_vocab = teacher_vocab or vocab
    teacher = torch.randn(*shape, teacher_vocab, generator=gen) * scale
    teacher[..., :vocab] = 0.6 * teacher[..., :vocab] + 0.8 * student
    return student.to(dtype), teacher.to(dtype)


def make_labels(shape=N_ROWS, vocab=VOCAB, ignored=(1,), seed=1):
    labels = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))
    flat = labels.view(-1)
    for i in ignored:
        flat[i] = -100
    return labels


def run_both(student, teacher, labels, backend_device, grad_scale=1.0, teacher_grad=True, **kw):
    """(output, student grad, teacher grad) from the backend, and (loss, stats, grads) from the oracle."""
    return (
        backend_backward(student, teacher, labels, backend_device, grad_scale, teacher_grad, **kw),
        oracle_backward(student, teacher, labels, grad_scale, teacher_grad, **kw),
    )


def backend_backward(student, teacher, labels, backend_device, weight=1.0, teacher_grad=True, **kw):
    """(output, student grad, teacher grad) after the backward of ``(loss * weight).sum()`` on the backend;
    ``weight`` multiplies a scalar loss; with ``reduction="none"``, the rows get ``_row_weights`` unless it is
    a tensor of the loss's shape."""
    backend, device = backend_device
    s = student.detach().to(device, copy=True).requires_grad_()
    t = teacher.detach().to(device, copy=True).requires_grad_(teacher_grad)
    y = None if labels is None else labels.to(device)
    out = distillation_loss(s, t, y, backend=backend, **kw)
    (out.loss * _weights(weight, out.loss).to(device)).sum().backward()
    return out, s.grad, t.grad


def oracle_backward(student, teacher, labels, weight=1.0, teacher_grad=True, **kw):
    """(loss, stats, student grad, teacher grad) from the float64 oracle, weighted as in ``backend_backward``."""
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.detach().double().requires_grad_(teacher_grad)
    kw64 = dict(kw)
    kw64["divergence_name"] = kw64.pop("divergence", "forward_kl")
    ref_loss, ref_stats = oracle(s64, t64, labels, **kw64)
    (ref_loss * _weights(weight, ref_loss).double()).sum().backward()
    return ref_loss.detach(), ref_stats, s64.grad, t64.grad


def _weights(weight, loss):
    if isinstance(weight, torch.Tensor):
        return weight
    return torch.tensor(weight) if loss.dim() == 0 else _row_weights(loss.shape)


def _row_weights(shape):
    return torch.linspace(0.5, 2.0, math.prod(shape)).reshape(shape)


def assert_matches(result, reference, dtype=torch.float32, check_teacher=True):
    (out, grad_s, grad_t), (ref_loss, ref_stats, ref_grad_s, ref_grad_t) = result, reference
    loss_rtol, grad_rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.loss.detach().cpu().double(), ref_loss, rtol=loss_rtol, atol=1e-5)
    for name in ("soft", "hard", "teacher_ce", "agreement"):
        torch.testing.assert_close(
            getattr(out, name).cpu().double(),
            ref_stats[name],
            rtol=loss_rtol,
            atol=1e-5,
            equal_nan=True,
            msg=lambda m, name=name: f"{name}: {m}",
        )
    assert int(out.num_tokens) == ref_stats["num_tokens"]
    assert_grad_close(grad_s, ref_grad_s, grad_rtol, "student gradient")
    if check_teacher:
        assert_grad_close(grad_t, ref_grad_t, grad_rtol, "teacher gradient")


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("alpha", [1.0, 0.3, 0.0])
def test_divergences_temperatures_alphas(backend_device, divergence, temperature, alpha):
    student, teacher = make_logits()
    labels = make_labels()
    result, reference = run_both(
        student,
        teacher,
        labels,
        backend_device,
        grad_scale=0.37,
        divergence=divergence,
        temperature=temperature,
        alpha=alpha,
        beta=0.3,
        skew=0.2,
    )
    assert_matches(result, reference)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dtypes(backend_device, divergence, dtype):
    student, teacher = make_logits(dtype=dtype)
    result, reference = run_both(
        student,
        teacher,
        make_labels(),
        backend_device,
        divergence=divergence,
        alpha=0.5,
        temperature=2.0,
        teacher_ce_weight=0.25,
    )
    assert result[1].dtype == dtype
    assert result[0].loss.dtype == torch.float32  # statistics and loss stay fp32
    assert_matches(result, reference, dtype)


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_teacher_argmax_hard_labels(backend_device, divergence):
    student, teacher = make_logits(seed=3)
    for labels in (make_labels(), None):
        result, reference = run_both(
            student,
            teacher,
            labels,
            backend_device,
            divergence=divergence,
            alpha=0.3,
            hard_labels="teacher_argmax",
            temperature=1.5,
        )
        assert_matches(result, reference)


MIX_VOCAB = 2053  # not a power of two, past one 1024-column gradient block; smaller for the interpreter


@pytest.mark.parametrize(("alpha", "reduction"), [(0.0, "mean"), (0.4, "sum"), (0.4, "none")])
@pytest.mark.parametrize("label_weight", [0.0, 0.3, 0.5, 1.0])
def test_label_weight_mixes_the_argmax_and_label_cross_entropies(backend_device, label_weight, alpha, reduction):
    """hard = (1 - w) CE(student, teacher argmax) + w CE(student, labels), loss and gradients from one call."""
    student, teacher = make_logits(shape=(10,), vocab=MIX_VOCAB, seed=21)
    labels = make_labels(shape=(10,), vocab=MIX_VOCAB, ignored=(1, 6))
    assert bool((labels != teacher.argmax(-1)).all())  # the two targets differ: the mix is visible
    result, reference = run_both(
        student,
        teacher,
        labels,
        backend_device,
        grad_scale=0.37,
        alpha=alpha,
        temperature=1.5,
        hard_labels="teacher_argmax",
        label_weight=label_weight,
        teacher_ce_weight=0.25,
        reduction=reduction,
    )
    assert_matches(result, reference)


@pytest.mark.parametrize("label_weight", [0.0, 0.5, 1.0])
def test_label_weight_with_minus_inf_at_one_target(backend_device, label_weight):
    # Row 0: -inf at the teacher's argmax, row 1: -inf at the label, row 2 ignored and holding +inf. A target
    # of weight 0 is left out (w=1 is finite in row 0, w=0 in row 1: not 0 * inf = NaN); the gradient
    # softmax - onehot stays finite; the ignored row counts for nothing.
    clean_s, teacher = make_logits(shape=(3,), vocab=MIX_VOCAB, seed=22)
    labels = torch.tensor([7, 8, -100])
    teacher[0, 5] = 1e3
    clean_s[0, 5] = clean_s[1, 8] = -math.inf
    student = clean_s.clone()
    student[2, 3] = math.inf
    kw = {"alpha": 0.0, "hard_labels": "teacher_argmax", "label_weight": label_weight, "reduction": "none"}
    result = backend_backward(student, teacher, labels, backend_device, teacher_grad=False, **kw)
    out, grad_s, _ = result
    infinite = {0.0: [True, False], 0.5: [True, True], 1.0: [False, True]}[label_weight]
    assert out.loss[:2].isinf().tolist() == infinite and out.loss[2].item() == 0
    assert bool(grad_s.isfinite().all()) and bool((grad_s[2] == 0).all())
    assert_matches(result, oracle_backward(clean_s, teacher, labels, teacher_grad=False, **kw), check_teacher=False)


def test_label_weight_changes_nothing_with_labels_as_the_hard_target(backend_device):
    student, teacher = make_logits(shape=(4,), vocab=MIX_VOCAB, seed=23)
    labels = make_labels(shape=(4,), vocab=MIX_VOCAB)
    plain, mixed = (
        backend_backward(student, teacher, labels, backend_device, alpha=0.5, label_weight=w) for w in (0.0, 0.5)
    )
    assert torch.equal(plain[0].loss, mixed[0].loss) and torch.equal(plain[1], mixed[1])


@pytest.mark.parametrize("divergence", ["reverse_kl", "skew_forward_kl"])
def test_teacher_ce_weight_trains_teacher_only_through_ce(backend_device, divergence):
    student, teacher = make_logits(seed=4)
    result, reference = run_both(
        student,
        teacher,
        make_labels(),
        backend_device,
        divergence=divergence,
        alpha=0.6,
        teacher_ce_weight=0.7,
        temperature=3.0,
        grad_scale=2.0,
    )
    assert_matches(result, reference)
    assert result[2] is not None and bool((result[2] != 0).any())


def test_teacher_without_ce_weight_gets_no_gradient(backend_device):
    student, teacher = make_logits()
    (_, _, grad_t), _ = run_both(student, teacher, make_labels(), backend_device, alpha=0.5)
    assert grad_t is None or bool((grad_t == 0).all())


@pytest.mark.parametrize("divergence", ["forward_kl", "tvd", "skew_reverse_kl"])
def test_padded_vocabularies(backend_device, divergence):
    # Student head padded to 5056, teacher to 5120; only the first 4999 columns are real tokens.
    student, teacher = make_logits(vocab=5056, teacher_vocab=5120, seed=5)
    student[..., 4999:] = 7.0  # padding garbage that must not leak into either softmax
    teacher[..., 4999:] = 9.0
    labels = make_labels(vocab=4999)
    result, reference = run_both(
        student,
        teacher,
        labels,
        backend_device,
        divergence=divergence,
        vocab_size=4999,
        alpha=0.4,
        teacher_ce_weight=0.5,
    )
    _, grad_s, grad_t = result
    # The oracle only sees the real columns; padding columns must get exactly zero gradient.
    assert bool((grad_s[..., 4999:] == 0).all()) and bool((grad_t[..., 4999:] == 0).all())
    ref_loss, stats, ref_grad_s, ref_grad_t = reference
    pad = torch.nn.functional.pad
    reference = (ref_loss, stats, pad(ref_grad_s, (0, 0)), pad(ref_grad_t, (0, 0)))
    assert_matches(result, reference)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(backend_device, reduction):
    student, teacher = make_logits(shape=(3, 2), seed=6)
    labels = make_labels(shape=(3, 2), ignored=(0, 4))
    result, reference = run_both(
        student,
        teacher,
        labels,
        backend_device,
        reduction=reduction,
        divergence="jsd",
        alpha=0.5,
        teacher_ce_weight=0.3,
    )
    assert result[0].loss.shape == ((3, 2) if reduction == "none" else ())
    if reduction == "none":
        assert result[0].loss[0, 0] == 0 and result[0].loss[2, 0] == 0  # ignored positions
    assert_matches(result, reference)


def test_all_rows_ignored_give_zero_loss_and_gradients(backend_device):
    student, teacher = make_logits()
    labels = torch.full(N_ROWS, -100)
    for divergence in DIVERGENCES:
        (out, grad_s, grad_t), _ = run_both(
            student, teacher, labels, backend_device, divergence=divergence, alpha=0.5, teacher_ce_weight=1.0
        )
        assert out.loss.item() == 0.0 and out.num_tokens.item() == 0
        assert bool((grad_s == 0).all()) and bool((grad_t == 0).all())
        assert not any(torch.isnan(getattr(out, k)).any() for k in ("loss", "soft", "hard", "teacher_ce"))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits_and_banned_tokens(backend_device, divergence):
    student, teacher = make_logits(seed=7, scale=1.0)
    student = student.sign() * 1e4 * (student.abs() > 2.5) + student  # a few logits near ±1e4
    teacher = teacher.sign() * 1e4 * (teacher.abs() > 2.5) + teacher
    banned = torch.rand(teacher.shape, generator=torch.Generator().manual_seed(8)) < 0.3
    teacher = teacher.masked_fill(banned, -math.inf)
    labels = make_labels()
    if divergence == "reverse_kl":
        # KL(q || p) is +inf where the teacher bans a token the student allows: that is the math, not a bug.
        out = distillation_loss(
            student.to(backend_device[1]),
            teacher.to(backend_device[1]),
            labels.to(backend_device[1]),
            divergence=divergence,
            backend=backend_device[0],
        )
        assert out.loss.item() == math.inf
        teacher = teacher.masked_fill(banned, -1e4)
    result, reference = run_both(
        student, teacher, labels, backend_device, divergence=divergence, alpha=0.7, temperature=1.0
    )
    assert torch.isfinite(result[0].loss)
    (out, grad_s, _), (ref_loss, _, ref_grad, _) = result, reference
    # Logits of 1e4 in fp32 carry an absolute rounding error of ~5e-4 in every log-probability.
    torch.testing.assert_close(out.loss.detach().cpu().double(), ref_loss, rtol=1e-3, atol=1e-3)
    assert_grad_close(grad_s, ref_grad, 1e-2)


def large_confident_logits(offset=1e3):
    """Logits near ±``offset`` (row by row) whose labels win by margins of 6 to 18: per-token cross-entropies
    from about 1e-1 down to 1e-6, below an fp32 ulp at the offset (6e-5 at 1e3)."""
    student, teacher = make_logits(seed=11)
    teacher = student + 0.1 * (teacher - 0.8 * student)  # close distributions: divergences near 1e-2
    labels = make_labels(ignored=())
    margins = torch.tensor([6.0, 10.0, 14.0, 18.0, 12.0, 16.0]).reshape(N_ROWS)
    for logits in (student, teacher):
        top = logits.amax(-1)
        logits.scatter_(-1, labels.unsqueeze(-1), (top + margins).unsqueeze(-1))
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0]).reshape(*N_ROWS, 1)
    return student + signs * offset, teacher + signs * offset, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_cross_entropy_at_large_logits(backend_device, temperature):
    # CE = log sum exp(x - m) - (x_y - m); as lse - x_y, both near 1e3, it was off by up to 6e-5.
    student, teacher, labels = large_confident_logits()
    result, (ref_loss, ref_stats, ref_grad, _) = run_both(
        student,
        teacher,
        labels,
        backend_device,
        alpha=0.0,
        teacher_ce_weight=1.0,
        reduction="none",
        temperature=temperature,
    )
    out, grad_s = result[0], result[1]
    torch.testing.assert_close(out.loss.detach().cpu().double(), ref_loss, rtol=1e-4, atol=1e-6)
    for name in ("hard", "teacher_ce"):
        torch.testing.assert_close(getattr(out, name).cpu().double(), ref_stats[name], rtol=1e-4, atol=1e-6)
    # q_y - 1 cancels at fp32's resolution near 1 (6e-8 per ulp): an absolute floor of a few ulps.
    assert_grad_close(grad_s, ref_grad, 1e-4, atol=1e-6)


@pytest.mark.parametrize(("offset", "temperature"), [(1e3, 1.0), (1e3, 3.0), (1e4, 3.0), (1e4, 0.7)])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_divergences_at_large_logits(backend_device, divergence, offset, temperature):
    # log q = (s - max) / T - log sum exp((s - max) / T), not s / T - lse: divergences near 1e-2 at logits
    # near ±1e3. The shift comes first: s / T is itself rounded by half an ulp of s / T (3e-5 at 1e3 / 3),
    # which was 1e-4 in the gradient at 1e4. T = 3 and 0.7, not 2 or 0.5: dividing by a power of two is exact.
    student, teacher, labels = large_confident_logits(offset)
    result, (ref_loss, _, ref_grad, _) = run_both(
        student, teacher, labels, backend_device, divergence=divergence, reduction="none", temperature=temperature
    )
    # fp32 log-probs near -15 round to ~1e-6 each: that (times T²), not the logits' size, is the loss's floor.
    atol = 5e-6 if temperature == 1.0 else 2e-6 * temperature**2
    torch.testing.assert_close(result[0].loss.detach().cpu().double(), ref_loss, rtol=1e-4, atol=atol)
    assert_grad_close(result[1], ref_grad, 1e-3, atol=1e-6)


@pytest.mark.parametrize(("divergence", "skew"), [("reverse_kl", 0.1), ("skew_reverse_kl", 0.0)])
def test_one_banned_token_makes_reverse_kl_infinite(backend_device, divergence, skew):
    backend, device = backend_device
    student, teacher = make_logits(shape=(2,))
    teacher[0, 7] = -math.inf  # a single banned token in row 0; row 1 is untouched
    out = distillation_loss(
        student.to(device), teacher.to(device), divergence=divergence, skew=skew, reduction="none", backend=backend
    )
    assert out.loss[0].item() == math.inf and math.isfinite(out.loss[1].item())


@pytest.mark.parametrize("skew", [0.5, 0.9, 0.99])
def test_skew_reverse_kl_near_skew_one(backend_device, skew):
    # D = sum q (x - log1p(x)), x = (1 - skew)(p/q - 1): at skew 0.99 sum q log(q/m) was 8.3e-3 off (V=5003).
    backend, device = backend_device
    student, teacher = make_logits(seed=5, scale=1.0)
    s = student.to(device, copy=True).requires_grad_()
    out = distillation_loss(
        s, teacher.to(device), divergence="skew_reverse_kl", skew=skew, reduction="none", backend=backend
    )
    (out.loss * _row_weights(out.loss.shape).to(device)).sum().backward()
    s64 = student.detach().double().requires_grad_()
    ref, _ = oracle(s64, teacher.double(), divergence_name="skew_reverse_kl", skew=skew, reduction="none")
    (ref * _row_weights(ref.shape).double()).sum().backward()
    torch.testing.assert_close(out.loss.detach().cpu().double(), ref.detach(), rtol=1e-4, atol=0.0)
    assert_grad_close(s.grad, s64.grad, 2e-4)


# A -inf logit on one side where the other side has mass: the divergences that divide by that side.
INFINITE_CASES = pytest.mark.parametrize(
    ("divergence", "skew", "side"),
    [
        ("forward_kl", 0.1, "student"),
        ("skew_forward_kl", 0.0, "student"),
        ("reverse_kl", 0.1, "teacher"),
        ("skew_reverse_kl", 0.0, "teacher"),
    ],
)


def one_infinite_row(side, rows=3):
    """Logits ``[rows, VOCAB]`` with one -inf on ``side`` in row 0, and labels that avoid its column."""
    student, teacher = make_logits(shape=(rows,))
    (student if side == "student" else teacher)[0, 7] = -math.inf
    labels = make_labels(shape=(rows,), ignored=())
    assert not bool((labels == 7).any())
    return student, teacher, labels


@INFINITE_CASES
@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_infinite_divergence_has_nan_gradient_on_its_row(backend_device, divergence, skew, side, alpha):
    # One answer on both backends: a -inf logit on one side where the other side has mass makes the row's
    # divergence +inf (not 4.3e37 from clamped log-probabilities), and that row's student gradient NaN in
    # every column (not a mix of ±inf, NaN and finite entries); the other rows are untouched.
    student, teacher, labels = one_infinite_row(side)
    kw = {"divergence": divergence, "skew": skew, "alpha": alpha, "reduction": "none"}
    out, grad_s, _ = backend_backward(student, teacher, labels, backend_device, **kw)
    assert out.loss[0].item() == math.inf and out.soft.item() == math.inf
    assert bool(torch.isnan(grad_s[0]).all())
    ref_loss, _, ref_grad, _ = oracle_backward(student[1:], teacher[1:], labels[1:], **kw)
    torch.testing.assert_close(out.loss[1:].detach().cpu().double(), ref_loss, rtol=2e-5, atol=1e-5)
    # _row_weights over 3 rows, not 2: compare row by row, unweighted.
    weights = _row_weights((3,))
    assert_grad_close(grad_s[1:].cpu() / weights[1:, None], ref_grad / _row_weights((2,))[:, None], 1e-4)


@INFINITE_CASES
def test_alpha_zero_leaves_an_infinite_divergence_out(backend_device, divergence, skew, side):
    # With alpha = 0 the soft term is not part of the loss, neither its value nor its gradient (0 * inf and
    # 0 * NaN would be NaN), as the hard term is left out at alpha = 1; the soft statistic still reports it.
    student, teacher, labels = one_infinite_row(side)
    for reduction in ("mean", "none"):
        result, reference = run_both(
            student,
            teacher,
            labels,
            backend_device,
            divergence=divergence,
            skew=skew,
            alpha=0.0,
            teacher_ce_weight=0.5,
            reduction=reduction,
        )
        assert bool(torch.isfinite(result[0].loss).all()) and result[0].soft.item() == math.inf
        assert_matches(result, reference)


def test_alpha_zero_leaves_a_nan_teacher_out(backend_device):
    # The same rule for NaN: with alpha = 0 and no teacher cross-entropy no term of the loss reads the teacher,
    # so a NaN in its logits shows in the soft statistic only (loss and gradient are the hard term's).
    student, teacher = make_logits(shape=(3,), seed=16)
    teacher[1, 20] = math.nan
    labels = make_labels(shape=(3,), ignored=())
    result, reference = run_both(student, teacher, labels, backend_device, alpha=0.0, reduction="none")
    assert bool(torch.isfinite(result[0].loss).all()) and math.isnan(result[0].soft.item())
    assert_matches(result, reference)


@INFINITE_CASES
def test_zero_grad_output_gives_exactly_zero_gradient(backend_device, divergence, skew, side):
    # A row whose grad_output is 0 gets exactly 0, as an ignored row does, even where its gradient is NaN
    # (an infinite divergence in row 0, a NaN logit in row 2): 0 * NaN must not leak into the step.
    student, teacher, labels = one_infinite_row(side)
    student[2, 11] = math.nan
    kw = {"divergence": divergence, "skew": skew, "alpha": 0.5, "teacher_ce_weight": 0.5}
    weights = torch.tensor([0.0, 1.5, 0.0])
    out, grad_s, grad_t = backend_backward(student, teacher, labels, backend_device, weights, reduction="none", **kw)
    assert out.loss[0].item() == math.inf and math.isnan(out.loss[2].item())
    assert bool((grad_s[0] == 0).all() and (grad_s[2] == 0).all())
    assert bool((grad_t[0] == 0).all() and (grad_t[2] == 0).all())
    _, _, ref_s, ref_t = oracle_backward(student[1:2], teacher[1:2], labels[1:2], torch.tensor([1.5]), **kw)
    assert_grad_close(grad_s[1:2], ref_s, 1e-4, "student gradient")
    assert_grad_close(grad_t[1:2], ref_t, 1e-4, "teacher gradient")
    # A zero grad_output of a reduced loss: every row's factor is 0.
    _, grad_s, grad_t = backend_backward(student, teacher, labels, backend_device, 0.0, reduction="sum", **kw)
    assert bool((grad_s == 0).all() and (grad_t == 0).all())


@pytest.mark.parametrize("alpha", [0.5, 0.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_a_column_banned_on_both_sides_contributes_nothing(backend_device, divergence, alpha):
    # -inf on both sides: p = q = 0 there, so every term of every divergence is 0 (not 0 * (-inf + inf)).
    student, teacher = make_logits(shape=(3,), seed=12)
    banned = [7, 4100]  # one in each 4096-column block
    student[:, banned] = -math.inf
    teacher[:, banned] = -math.inf
    labels = make_labels(shape=(3,), ignored=())
    result, reference = run_both(
        student,
        teacher,
        labels,
        backend_device,
        divergence=divergence,
        skew=0.0,
        alpha=alpha,
        temperature=2.0,
        teacher_ce_weight=0.3,
        hard_labels="teacher_argmax",
    )
    assert_matches(result, reference)
    assert bool((result[1][:, banned] == 0).all() and (result[2][:, banned] == 0).all())


@pytest.mark.parametrize("alpha", [1.0, 0.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_ignored_rows_with_non_finite_logits_count_for_nothing(backend_device, divergence, alpha):
    # Ignored rows count for nothing whatever they hold: +inf, NaN, a whole row of -inf. Loss, statistics and
    # the other rows' gradients are those of clean logits; the ignored rows' gradients are exactly 0.
    clean_s, clean_t = make_logits(shape=(4,), seed=13)
    student, teacher = clean_s.clone(), clean_t.clone()
    student[1, 3], teacher[1, 5] = math.inf, math.nan
    student[2], teacher[2, 9] = -math.inf, math.inf
    labels = make_labels(shape=(4,), ignored=(1, 2))
    kw = {"divergence": divergence, "alpha": alpha, "teacher_ce_weight": 0.5, "skew": 0.0}
    result = backend_backward(student, teacher, labels, backend_device, **kw)
    assert_matches(result, oracle_backward(clean_s, clean_t, labels, **kw))
    assert bool((result[1][1:3] == 0).all() and (result[2][1:3] == 0).all())


def test_minus_inf_at_the_label_makes_cross_entropy_infinite(backend_device):
    # A -inf logit at the label: the cross-entropy is +inf and its gradient softmax - onehot stays finite, as
    # torch.nn.functional.cross_entropy's (jsd stays finite with a -inf on either side).
    student, teacher = make_logits(shape=(2,), seed=14)
    labels = torch.tensor([7, 8])
    student[0, 7] = -math.inf  # the student's hard cross-entropy
    teacher[1, 8] = -math.inf  # the teacher's cross-entropy
    result, reference = run_both(
        student, teacher, labels, backend_device, divergence="jsd", alpha=0.5, teacher_ce_weight=0.5, reduction="none"
    )
    out, grad_s, grad_t = result
    assert out.loss[0].item() == math.inf and out.loss[1].item() == math.inf
    assert out.hard.item() == math.inf and out.teacher_ce.item() == math.inf
    assert_grad_close(grad_s, reference[2], 1e-4, "student gradient")
    assert_grad_close(grad_t, reference[3], 1e-4, "teacher gradient")


def test_argmaxes_are_of_the_raw_logits(backend_device):
    # 1000 + 2^-14 and 1000 + 2^-13 are adjacent in fp32 and s * (1/3) rounds them to one number: the argmax
    # is the raw logits' (torch.argmax: the first index of the max), not the first of a tie made by rounding.
    low, high = 1000.0 + 2.0**-14, 1000.0 + 2.0**-13
    assert (torch.tensor([low, high]) * (1 / 3.0)).unique().numel() == 1
    student, teacher = make_logits(shape=(2,), seed=15)
    teacher[0, 5], teacher[0, 9] = low, high  # argmax 9
    student[0, 5], student[0, 9] = 1000.0, 1000.5  # argmax 9 at every temperature
    result, reference = run_both(
        student, teacher, None, backend_device, temperature=3.0, alpha=0.5, hard_labels="teacher_argmax"
    )
    assert result[0].agreement.item() == 0.5  # row 0 agrees (on 9), row 1 does not
    assert_matches(result, reference)


def test_nan_input_propagates_to_loss(backend_device):
    backend, device = backend_device
    student, teacher = make_logits()
    student[0, 1, 17] = math.nan
    out = distillation_loss(student.to(device), teacher.to(device), backend=backend)
    assert math.isnan(out.loss.item())


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_identities(backend_device, divergence):
    backend, device = backend_device
    student, teacher = make_logits(seed=9)
    student, teacher = student.to(device), teacher.to(device)
    out = distillation_loss(student, teacher, divergence=divergence, reduction="none", backend=backend, skew=0.3)
    assert bool((out.loss >= -1e-6).all()), "divergences are non-negative"
    if divergence == "tvd":
        assert bool((out.loss <= 1 + 1e-6).all())
    same = distillation_loss(
        student.clone().requires_grad_(), student, divergence=divergence, reduction="none", backend=backend
    )
    assert same.loss.abs().max().item() < 1e-5, "zero when student == teacher"


def test_jsd_limits_are_the_kls(backend_device):
    backend, device = backend_device
    student, teacher = make_logits(seed=10)
    student, teacher = student.to(device), teacher.to(device)
    for beta, kl in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd = distillation_loss(student, teacher, divergence="jsd", beta=beta, temperature=2.0, backend=backend)
        ref = distillation_loss(student, teacher, divergence=kl, temperature=2.0, backend=backend)
        torch.testing.assert_close(jsd.loss, ref.loss)
    # and a genuine JSD lies strictly between 0 and both KLs' scale
    mid = distillation_loss(student, teacher, divergence="jsd", beta=0.5, backend=backend).loss.item()
    assert 0 < mid < distillation_loss(student, teacher, backend=backend).loss.item()


def test_t2_scaling_flag(backend_device):
    backend, device = backend_device
    student, teacher = make_logits()
    student, teacher = student.to(device), teacher.to(device)
    scaled = distillation_loss(student, teacher, temperature=3.0, backend=backend).loss
    plain = distillation_loss(student, teacher, temperature=3.0, t2_scaling=False, backend=backend).loss
    torch.testing.assert_close(scaled, 9.0 * plain)


def test_loss_is_the_documented_mix_of_statistics(backend_device):
    backend, device = backend_device
    student, teacher = make_logits(seed=11)
    out = distillation_loss(
        student.to(device),
        teacher.to(device),
        make_labels().to(device),
        alpha=0.3,
        teacher_ce_weight=0.2,
        temperature=2.0,
        backend=backend,
    )
    torch.testing.assert_close(out.loss, 0.3 * out.soft + 0.7 * out.hard + 0.2 * out.teacher_ce)


def test_no_grad_forward(backend_device):
    backend, device = backend_device
    student, teacher = make_logits()
    with torch.no_grad():
        out = distillation_loss(student.to(device).requires_grad_(), teacher.to(device), backend=backend)
    assert not out.loss.requires_grad and out.loss.item() > 0


def test_module_holds_options_and_callbacks_can_change_them():
    student, teacher = make_logits()
    labels = make_labels()
    loss_fn = DistillationLoss(divergence="reverse_kl", temperature=2.0, alpha=0.5, backend="torch")
    first = loss_fn(student, teacher, labels)
    direct = distillation_loss(student, teacher, labels, divergence="reverse_kl", temperature=2.0, alpha=0.5)
    torch.testing.assert_close(first.loss, direct.loss)
    loss_fn.alpha, loss_fn.temperature = 1.0, 1.0
    torch.testing.assert_close(
        loss_fn(student, teacher, labels).loss,
        distillation_loss(student, teacher, labels, divergence="reverse_kl").loss,
    )
    assert "alpha=1.0" in repr(loss_fn)
    loss_fn.alpha = 1.5
    with pytest.raises(ValueError, match="alpha"):
        loss_fn(student, teacher, labels)
    with pytest.raises(ValueError, match="divergence"):
        DistillationLoss(divergence="kl")
