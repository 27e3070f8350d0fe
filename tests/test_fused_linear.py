"""fused_linear_distillation_loss against the float64 oracle on explicit ``hidden @ weight.T + bias`` logits."""

import warnings

import pytest
import torch
from oracle import oracle

from lit_distill import DistillationLoss
from lit_distill.kernels import DIVERGENCES, fused_linear_distillation_loss, linear_plan
from lit_distill.kernels.linear_plan import Head, choose_chunk_size, planned_extra_bytes
from lit_distill.kernels.options import LossOptions
from lit_distill.kernels.rows import row_targets

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf - inf inside the interpreter
N_TOKENS, H_S, H_T, VOCAB = 13, 16, 24, 2053  # hidden sizes differ; V not a power of two
NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight", "teacher_bias")


def make_tensors(v_s=VOCAB, v_t=VOCAB, bias=True, seed=0, lead=(N_TOKENS,)):
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(*lead, H_S, generator=gen)
    w_s = torch.randn(v_s, H_S, generator=gen) * 0.4
    h_t = torch.randn(*lead, H_T, generator=gen)
    w_t = torch.randn(v_t, H_T, generator=gen) * 0.4
    b_s = torch.randn(v_s, generator=gen) * 0.5 if bias else None
    b_t = torch.randn(v_t, generator=gen) * 0.5 if bias else None
    return [h_s, w_s, b_s, h_t, w_t, b_t]


def make_labels(vocab=VOCAB, lead=(N_TOKENS,), ignored=(2, 7)):
    labels = torch.randint(0, vocab, lead, generator=torch.Generator().manual_seed(1))
    labels.view(-1)[list(ignored)] = -100
    return labels


def compare(backend_device, tensors, labels, *, grad_weights=0.7, rtol=1e-4, chunk_size=5, **kw):
    """Run the fused loss and the oracle on explicit logits; compare loss, statistics and all six gradients."""
    backend, device = backend_device
    leaves = [None if x is None else x.detach().to(device, copy=True).requires_grad_() for x in tensors]
    h_s, w_s, b_s, h_t, w_t, b_t = leaves
    out = fused_linear_distillation_loss(
        h_s,
        w_s,
        h_t,
        w_t,
        None if labels is None else labels.to(device),
        student_bias=b_s,
        teacher_bias=b_t,
        chunk_size=chunk_size,
        backend=backend,
        **kw,
    )
    weights = grad_weights if out.loss.dim() == 0 else torch.linspace(0.5, 2, out.loss.numel()).reshape(out.loss.shape)
    (out.loss * (weights if out.loss.dim() == 0 else weights.to(device))).sum().backward()

    ref = [None if x is None else x.detach().double().requires_grad_() for x in tensors]
    r_hs, r_ws, r_bs, r_ht, r_wt, r_bt = ref
    logits_s = r_hs @ r_ws.T + (0 if r_bs is None else r_bs)
    logits_t = r_ht @ r_wt.T + (0 if r_bt is None else r_bt)
    kw = dict(kw)
    kw["divergence_name"] = kw.pop("divergence", "forward_kl")
    ref_loss, ref_stats = oracle(logits_s, logits_t, labels, **kw)
    ref_weights = weights if ref_loss.dim() == 0 else weights.double()
    (ref_loss * ref_weights).sum().backward()

    torch.testing.assert_close(out.loss.detach().cpu().double(), ref_loss.detach(), rtol=rtol, atol=1e-5)
    for name in ("soft", "hard", "teacher_ce", "agreement"):
        torch.testing.assert_close(
            getattr(out, name).cpu().double(), ref_stats[name], rtol=rtol, atol=1e-5, equal_nan=True
        )
    assert int(out.num_tokens) == ref_stats["num_tokens"]
    for name, got, want in zip(NAMES, leaves, ref, strict=True):
        if want is None:
            continue
        expected = want.grad
        if expected is None or not bool((expected != 0).any()):
            assert got.grad is None or bool((got.grad == 0).all()), f"{name}: expected no gradient"
            continue
        assert got.grad is not None, f"{name}: missing gradient"
        assert got.grad.dtype == got.dtype
        err = (got.grad.cpu().double() - expected).abs().max().item()
        assert err <= rtol * expected.abs().max().item() + 1e-7, f"{name}: max error {err:.3g}"
    return out


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_divergences_and_alphas(backend_device, divergence, alpha):
    compare(
        backend_device,
        make_tensors(),
        make_labels(),
        divergence=divergence,
        alpha=alpha,
        temperature=1.7,
        beta=0.3,
        skew=0.2,
    )


@pytest.mark.parametrize("chunk_size", [1, 4, 13, 64, None])
def test_chunk_sizes(backend_device, chunk_size):
    compare(backend_device, make_tensors(seed=2), make_labels(), chunk_size=chunk_size, alpha=0.5)


def test_teacher_argmax_hard_labels(backend_device):
    compare(backend_device, make_tensors(seed=3), None, hard_labels="teacher_argmax", alpha=0.5, divergence="tvd")


@pytest.mark.parametrize(("alpha", "reduction"), [(0.0, "mean"), (0.4, "sum"), (0.4, "none")])
@pytest.mark.parametrize("label_weight", [0.0, 0.3, 0.5, 1.0])
def test_label_weight_mix(backend_device, label_weight, alpha, reduction):
    """(1 - w) CE(argmax) + w CE(labels) from one projection per chunk: loss, statistics and all six gradients."""
    compare(
        backend_device,
        make_tensors(seed=8),
        make_labels(),
        grad_weights=1.3,
        hard_labels="teacher_argmax",
        label_weight=label_weight,
        alpha=alpha,
        reduction=reduction,
        temperature=1.5,
        teacher_ce_weight=0.25,
    )


def test_co_distillation_reaches_the_teacher(backend_device):
    out = compare(
        backend_device,
        make_tensors(seed=4),
        make_labels(),
        teacher_ce_weight=0.6,
        alpha=0.3,
        divergence="reverse_kl",
        temperature=2.0,
        grad_weights=1.9,
    )
    assert out.teacher_ce.item() > 0


def test_without_biases_and_with_padded_heads(backend_device):
    tensors = make_tensors(v_s=2112, v_t=2176, bias=False, seed=5)
    tensors[1][2000:] = 3.0  # padding rows of the heads: their logits must not count
    tensors[4][2000:] = -2.0
    compare(backend_device, tensors, make_labels(vocab=2000), vocab_size=2000, alpha=0.5, teacher_ce_weight=0.2)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions(backend_device, reduction):
    compare(
        backend_device,
        make_tensors(seed=6, lead=(3, 5)),
        make_labels(lead=(3, 5)),
        reduction=reduction,
        divergence="skew_forward_kl",
        alpha=0.6,
        teacher_ce_weight=0.1,
    )


def test_all_tokens_ignored(backend_device):
    labels = torch.full((N_TOKENS,), -100)
    out = compare(backend_device, make_tensors(), labels, alpha=0.5)
    assert out.loss.item() == 0.0 and out.num_tokens.item() == 0


def bf16_tensors(seed=3):
    """The test tensors rounded to bf16, with heads that give logits of a few units, as a trained head does."""
    tensors = make_tensors(seed=seed)
    for i in (1, 4):
        tensors[i] = tensors[i] * 5
    return [x.to(torch.bfloat16) for x in tensors]


def oracle_on(tensors, labels, **kw):
    """Float64 oracle loss and gradients on the values of ``tensors`` (rounded as they are, then exact)."""
    ref = [x.detach().double().requires_grad_() for x in tensors]
    kw = dict(kw)
    kw["divergence_name"] = kw.pop("divergence", "forward_kl")
    loss, _ = oracle(ref[0] @ ref[1].T + ref[2], ref[3] @ ref[4].T + ref[5], labels, **kw)
    weights = torch.linspace(0.5, 2, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (loss * weights).sum().backward()
    return loss.detach(), [x.grad for x in ref], weights


def run_fused(tensors, labels, device, weights, **kw):
    leaves = [x.detach().to(device, copy=True).requires_grad_() for x in tensors]
    h_s, w_s, b_s, h_t, w_t, b_t = leaves
    out = fused_linear_distillation_loss(
        h_s, w_s, h_t, w_t, labels.to(device), student_bias=b_s, teacher_bias=b_t, **kw
    )
    (out.loss * weights.to(device, out.loss.dtype)).sum().backward()
    return out, leaves


def relative_errors(leaves, expected) -> dict:
    """Per input (the first ``len(leaves)`` of ``NAMES``), the largest gradient error over the largest entry."""
    return {
        name: ((got.grad.cpu().double() - want).abs().max() / want.abs().max()).item()
        for name, got, want in zip(NAMES[: len(leaves)], leaves, expected, strict=True)
    }


@pytest.mark.parametrize(
    ("divergence", "reduction", "chunk_size"), [("forward_kl", "mean", 5), ("jsd", "none", 4), ("forward_kl", "sum", 1)]
)
def test_bf16_inputs_lose_only_their_own_rounding(backend_device, divergence, reduction, chunk_size):
    # The chunk logits of bf16 inputs are fp32: the loss matches float64 on the same bf16 values to 1e-7
    # (with bf16 logits: 3.6e-5, and 2.8e-3 for a token's loss). The logit gradient is rounded to bf16 for the
    # matmuls and the bf16 gradients once more (each by up to 2^-8 of themselves; the interpreter truncates:
    # 2^-7), bf16 dW once per chunk (13 chunks at chunk_size=1): at most 7.3e-3 here (bf16 logits: 1.5e-2 to 2e-2).
    backend, device = backend_device
    tensors, labels = bf16_tensors(), make_labels()
    kw = {"divergence": divergence, "reduction": reduction, "alpha": 0.5, "teacher_ce_weight": 0.3}
    want, grads, weights = oracle_on(tensors, labels, **kw)
    out, leaves = run_fused(tensors, labels, device, weights, chunk_size=chunk_size, backend=backend, **kw)
    torch.testing.assert_close(out.loss.detach().cpu().double(), want, rtol=1e-6, atol=1e-7)
    assert all(x.grad.dtype == torch.bfloat16 for x in leaves)
    errors = relative_errors(leaves, grads)
    assert max(errors.values()) < 1e-2, errors


@pytest.fixture
def fresh_matmul_checks():
    """Forget the cached capability answers and warnings before and after a test that patches them."""
    caches = (linear_plan.fp32_output_matmul, linear_plan._warn_half_logits)  # before any patch
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()


def test_without_fp32_output_matmul_bf16_logits_with_one_warning(backend_device, monkeypatch, fresh_matmul_checks):
    # A device whose torch has no fp32-output matmul (and that is not allowed the CPU's fp32 copies).
    backend, device = backend_device
    monkeypatch.setattr(linear_plan, "fp32_output_matmul", lambda device, dtype: False)
    monkeypatch.setattr(linear_plan, "UPCAST_DEVICES", ())
    tensors, labels = bf16_tensors(), make_labels()
    kw = {"alpha": 0.5, "teacher_ce_weight": 0.3, "chunk_size": 5, "backend": backend}
    want, grads, weights = oracle_on(tensors, labels, alpha=0.5, teacher_ce_weight=0.3)
    message = r"no fp32-output matmul for torch.bfloat16 .* chunk logits are computed in torch.bfloat16"
    with pytest.warns(UserWarning, match=message) as caught:
        out, leaves = run_fused(tensors, labels, device, weights, **kw)
    ours = [w for w in caught if "fp32-output" in str(w.message)]  # not the interpreter's numpy warnings
    assert len(ours) == 1 and ours[0].filename == __file__  # once, pointing at the caller
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fp32-output")
        run_fused(tensors, labels, device, weights, **kw)  # once per device and dtype
    # Still right, to bf16 logits' precision.
    torch.testing.assert_close(out.loss.detach().cpu().double(), want, rtol=1e-3, atol=1e-5)
    errors = relative_errors(leaves, grads)
    assert max(errors.values()) < 6e-2, errors


def test_fp32_output_matmul_check(monkeypatch, fresh_matmul_checks):
    cpu = torch.device("cpu")
    assert isinstance(linear_plan.fp32_output_matmul(cpu, torch.bfloat16), bool)  # no kernel for CPU: a no

    def refused(*args, **kwargs):
        raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")  # torch < 2.8

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch, "mm", refused)
    assert linear_plan.fp32_output_matmul(cpu, torch.float16) is False
    monkeypatch.setattr(torch, "mm", out_of_memory)
    assert linear_plan.fp32_output_matmul(cpu, torch.float16) is False  # answered once, then cached
    linear_plan.fp32_output_matmul.cache_clear()
    with pytest.raises(torch.cuda.OutOfMemoryError):  # never taken for a refusal
        linear_plan.fp32_output_matmul(cpu, torch.float16)


@pytest.mark.parametrize("chunk_size", [1, None])
def test_autocast_bf16_sums_fp32_weight_gradients_in_fp32(chunk_size):
    tensors, labels = make_tensors(seed=7), make_labels()
    # Under autocast the matmuls take bf16 copies of the hidden states and weights; the bias stays fp32.
    rounded = [x.to(torch.bfloat16) if i in (0, 1, 3, 4) else x for i, x in enumerate(tensors)]
    want, grads, weights = oracle_on(rounded, labels, alpha=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, leaves = run_fused(tensors, labels, "cpu", weights, alpha=0.5, chunk_size=chunk_size, backend="torch")
    assert all(x.grad.dtype == torch.float32 for x in leaves[:3])
    torch.testing.assert_close(out.loss.detach().double(), want, rtol=1e-6, atol=1e-7)
    errors = relative_errors(leaves[:3], grads[:3])
    # dH is rounded to bf16 (as nn.Linear's under autocast); dW and db only by the bf16 logit gradient,
    # summed in fp32 however many chunks there are (13 at chunk_size=1).
    assert errors["student_hidden"] < 8e-3 and errors["student_weight"] < 4e-3 and errors["student_bias"] < 4e-3, errors


def test_tied_embedding_weight(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(8)
    embedding = torch.nn.Embedding(VOCAB, H_S)
    torch.nn.init.normal_(embedding.weight, std=0.3, generator=gen)  # on the CPU, where the generator is
    embedding = embedding.to(device)
    mix = torch.randn(H_S, H_S, generator=gen).to(device) * 0.3
    ids = torch.randint(0, VOCAB, (N_TOKENS,), generator=gen).to(device)
    teacher_h = torch.randn(N_TOKENS, H_T, generator=gen).to(device)
    teacher_w = torch.randn(VOCAB, H_T, generator=gen).to(device) * 0.4
    labels = make_labels().to(device)

    def hidden():
        return torch.tanh(embedding(ids) @ mix)

    out = fused_linear_distillation_loss(
        hidden(), embedding.weight, teacher_h, teacher_w, labels, alpha=0.5, chunk_size=6, backend=backend
    )
    out.loss.backward()
    fused_grad = embedding.weight.grad.clone()
    embedding.weight.grad = None
    from lit_distill import distillation_loss

    explicit = distillation_loss(
        hidden() @ embedding.weight.T, teacher_h @ teacher_w.T, labels, alpha=0.5, backend="torch"
    )
    explicit.loss.backward()
    torch.testing.assert_close(fused_grad, embedding.weight.grad, rtol=1e-4, atol=1e-6)


def test_no_grad_and_second_backward():
    h_s, w_s, _, h_t, w_t, _ = make_tensors()
    with torch.no_grad():
        out = fused_linear_distillation_loss(h_s.requires_grad_(), w_s, h_t, w_t, chunk_size=4)
    assert not out.loss.requires_grad and out.loss.item() > 0
    out = fused_linear_distillation_loss(h_s, w_s, h_t, w_t, chunk_size=4)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        out.loss.backward()


def test_module_form():
    h_s, w_s, b_s, h_t, w_t, b_t = make_tensors()
    labels = make_labels()
    loss_fn = DistillationLoss(divergence="jsd", alpha=0.4, temperature=2.0)
    got = loss_fn.fused_linear(h_s, w_s, h_t, w_t, labels, student_bias=b_s, teacher_bias=b_t, chunk_size=3)
    want = loss_fn(h_s @ w_s.T + b_s, h_t @ w_t.T + b_t, labels)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


def heads(vocab, hidden, dtype, student_grad=True, teacher_grad=False, cast=None):
    matmul = cast or dtype
    logits = torch.promote_types(matmul, torch.float32)
    student = Head(vocab, hidden, dtype, matmul, logits, bias=False, grad=student_grad)
    return student, student._replace(grad=teacher_grad)


def test_chunk_size_rule():
    student, teacher = heads(128256, 512, torch.float32)
    # All tokens when they fit; never more than there are, never less than one.
    assert choose_chunk_size(10, student, teacher, device_type="cpu", triton=False) == 10
    huge = heads(10**9, 512, torch.float32)
    assert choose_chunk_size(10, *huge, device_type="cpu", triton=False) == 1
    # Else the fewest equal chunks that fit, in multiples of 64.
    for n in (1000, 4096, 5000):
        chunk = choose_chunk_size(n, student, teacher, device_type="cpu", triton=False)
        plan = planned_extra_bytes(n, chunk, student, teacher, device_type="cpu", triton=False)
        assert chunk % 64 == 0 and sum(plan.values()) <= linear_plan.MEMORY_BUDGET_BYTES["cpu"]
        assert -(-n // chunk) == -(-n // 128)  # 128 tokens is the largest multiple of 64 that fits
    assert choose_chunk_size(1000, student, teacher, device_type="cpu", triton=False, budget=1 << 40) == 1000


def test_memory_plan_meets_the_gpu_bar():
    # The H200 benchmark: N=8192, H=4096, V=128256, bf16, Triton, frozen teacher. fp32 logits of both models
    # and the student's bf16 logit gradient, 1024 tokens at a time; dH and dW are the bf16 gradients returned.
    student, teacher = heads(128256, 4096, torch.bfloat16)
    chunk = choose_chunk_size(8192, student, teacher, device_type="cuda", triton=True)
    plan = planned_extra_bytes(8192, chunk, student, teacher, device_type="cuda", triton=True)
    assert chunk == 1024
    assert plan["logits"] == 1024 * 128256 * 4 * 2
    assert plan["logit gradients"] == 1024 * 128256 * 2
    assert sum(plan.values()) <= 1.5 * 2**30  # 1.225 GiB
    # The same bar for co-distillation, the PyTorch backend on CUDA, and fp32 parameters under autocast,
    # whose bf16 copies of both weights (as nn.Linear under autocast makes them) come on top.
    for student, teacher, triton in [
        (*heads(128256, 4096, torch.bfloat16, teacher_grad=True), True),
        (*heads(128256, 4096, torch.bfloat16), False),
        (*heads(128256, 4096, torch.float32, cast=torch.bfloat16), True),
    ]:
        chunk = choose_chunk_size(8192, student, teacher, device_type="cuda", triton=triton)
        plan = planned_extra_bytes(8192, chunk, student, teacher, device_type="cuda", triton=triton)
        casts = plan["weight and bias casts"]
        assert casts == (2 * 128256 * 4096 * 2 if student.dtype != student.matmul_dtype else 0)
        assert chunk >= 512 and sum(plan.values()) - casts <= 1.5 * 2**30, (chunk, plan)


@pytest.mark.slow
def test_triton_chunk_writes_a_bf16_gradient_from_fp32_logits():
    # The gradient pass scales and casts in one pass: into a new bf16 buffer, the fp32 logits left as they are.
    from lit_distill.kernels import triton_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU interpreter without a GPU
    gen = torch.Generator().manual_seed(9)
    s, t = (torch.randn(3, 1500, generator=gen).mul_(3).to(device) for _ in range(2))
    labels = torch.tensor([5, -100, 17], device=device)
    opts = LossOptions(alpha=0.5, teacher_ce_weight=0.2, divergence="jsd", temperature=1.5)
    pre = row_targets(labels, None, opts, 3, s.device)
    scale = torch.tensor([0.5, 0.0, 2.0], device=device)
    args = (labels, pre, scale, opts, 1500)
    _, (grad_s, grad_t) = triton_backend.fused_linear_chunk(s.clone(), t.clone(), *args, True, True)  # in place
    s_in, t_in = s.clone(), t.clone()
    _, (bf16_s, bf16_t) = triton_backend.fused_linear_chunk(s_in, t_in, *args, torch.bfloat16, torch.bfloat16)
    assert torch.equal(s_in, s) and torch.equal(t_in, t)
    for got, exact in ((bf16_s, grad_s), (bf16_t, grad_t)):
        assert got.dtype == torch.bfloat16
        if device == "cuda":
            assert torch.equal(got, exact.to(torch.bfloat16))  # rounded to nearest, once
        else:  # the interpreter truncates: within one bf16 step of the fp32 value
            assert bool(((got.double() - exact.double()).abs() <= exact.double().abs() * 2**-7).all())
        assert bool((exact[1] == 0).all()) and bool((got[1] == 0).all())  # the ignored row


S_H, S_W, T_H, T_W = torch.randn(6, 8), torch.randn(50, 8), torch.randn(6, 12), torch.randn(50, 12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"student_weight": torch.randn(50, 9)}, ValueError, r"student_hidden \(6, 8\) and student_weight \(50, 9\)"),
        ({"teacher_weight": torch.randn(50, 8)}, ValueError, r"teacher_hidden \(6, 12\) and teacher_weight"),
        ({"student_weight": torch.randn(50)}, ValueError, "must be \\(vocab, hidden\\)"),
        ({"student_bias": torch.randn(49)}, ValueError, r"student_bias \(49,\) must have shape \(50,\)"),
        ({"teacher_hidden": torch.randn(5, 12)}, ValueError, "same leading shape"),
        ({"student_weight": torch.randn(50, 8, device="meta")}, ValueError, "student_weight is on meta"),
        (
            {"teacher_weight": torch.randn(50, 12, dtype=torch.float64)},
            ValueError,
            "teacher_weight is torch.float64 but teacher_hidden is torch.float32",
        ),
        ({"labels": torch.zeros(5, dtype=torch.long)}, ValueError, r"labels shape \(5,\) must equal the hidden"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be positive"),
        ({"chunk_size": -3}, ValueError, "chunk_size must be positive"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size must be an int"),
        ({"student_hidden": torch.zeros(6, 8, dtype=torch.long)}, TypeError, "student_hidden must be floating"),
        ({"teacher_weight": torch.randn(64, 12)}, ValueError, "student vocabulary size 50 differs"),
    ],
)
def test_bad_input(kwargs, error, match):
    args = {"student_hidden": S_H, "student_weight": S_W, "teacher_hidden": T_H, "teacher_weight": T_W, **kwargs}
    with pytest.raises(error, match=match):
        fused_linear_distillation_loss(
            args.pop("student_hidden"),
            args.pop("student_weight"),
            args.pop("teacher_hidden"),
            args.pop("teacher_weight"),
            args.pop("labels", None),
            **args,
        )
