"""fused_linear_distillation_loss against the float64 oracle on explicit ``hidden @ weight.T + bias`` logits."""

import pytest
import torch
from oracle import oracle

from lit_distill import DistillationLoss
from lit_distill.kernels import DIVERGENCES, fused_linear_distillation_loss
from lit_distill.kernels.fused_linear import choose_chunk_size

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


def test_autocast_bf16_keeps_fp32_weight_gradients():
    tensors = make_tensors(seed=7)
    leaves = [x.clone().requires_grad_() for x in tensors]
    h_s, w_s, b_s, h_t, w_t, b_t = leaves
    labels = make_labels()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_distillation_loss(
            h_s, w_s, h_t, w_t, labels, student_bias=b_s, teacher_bias=b_t, alpha=0.5, chunk_size=4, backend="torch"
        )
    out.loss.backward()
    assert w_s.grad.dtype == torch.float32 and h_s.grad.dtype == torch.float32
    ref = [x.detach().double().requires_grad_() for x in tensors]
    ref_loss, _ = oracle(ref[0] @ ref[1].T + ref[2], ref[3] @ ref[4].T + ref[5], labels, alpha=0.5)
    ref_loss.backward()
    # bf16 projections: a few parts in a thousand.
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), rtol=2e-2, atol=2e-2)
    for got, want in zip(leaves[:3], ref[:3], strict=True):
        err = (got.grad.double() - want.grad).abs().max() / want.grad.abs().max()
        assert err < 5e-2


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


def test_chunk_size_rule():
    # 1 GiB on CUDA at V=128256 bf16 for both heads: 2048 tokens (GEMM-friendly multiple of 64).
    assert choose_chunk_size(8192, 128256, 128256, torch.bfloat16, torch.device("cuda"), triton=True) == 2048
    # Never more than the tokens there are, never less than one.
    assert choose_chunk_size(10, 128256, 128256, torch.float32, torch.device("cpu"), triton=False) == 10
    assert choose_chunk_size(10, 10**9, 10**9, torch.float32, torch.device("cpu"), triton=False) == 1
    cpu = choose_chunk_size(4096, 128256, 128256, torch.float32, torch.device("cpu"), triton=False)
    assert cpu % 64 == 0 and cpu * 128256 * 2 * 4 * 2 <= 256 << 20


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
