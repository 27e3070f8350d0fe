"""sparse_distillation_loss (teacher ids + log-probabilities) on both backends against the float64 oracle."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TOLERANCES, assert_grad_close
from oracle import sparse_oracle

from lit_distill import distillation_loss, fused_linear_sparse_distillation_loss, sparse_distillation_loss

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy inf - inf inside the interpreter

SHAPE = (2, 3)  # leading shape: 6 rows
VOCAB = 300  # small for the interpreter; not a power of two: its only block is the masked tail block
SLOTS = 8
CASES = [(False, "forward_kl"), (True, "forward_kl"), (True, "reverse_kl"), (True, "jsd"), (True, "tvd")]


def make_case(shape=SHAPE, vocab=VOCAB, k=SLOTS, width=None, seed=0, scale=2.0, mass=0.8, student=None):
    """Student logits ``(*shape, width)`` (``student`` ``[N, width]`` if given), teacher ids and log-probs
    ``(*shape, k)`` from a teacher correlated with the student (its top k, log-probs scaled so the slots hold
    about ``mass``), labels with one ignored. Row 1 has three empty slots (interleaved), row 2 none filled."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    student = torch.randn(n, width or vocab, generator=gen) * scale if student is None else student
    teacher = 0.7 * student[:, :vocab] + torch.randn(n, vocab, generator=gen) * scale
    logprobs, ids = torch.log_softmax(teacher, -1).topk(k, -1)
    logprobs = logprobs - logprobs.logsumexp(-1, keepdim=True) + math.log(mass)
    perm = torch.argsort(torch.rand(n, k, generator=gen), -1)  # slots in no particular order
    ids, logprobs = ids.gather(1, perm), logprobs.gather(1, perm)
    if n > 2:
        ids[1, 1::3] = -1
        ids[2] = -1
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[min(4, n - 1)] = -100
    return (student.reshape(*shape, -1), ids.reshape(*shape, k), logprobs.reshape(*shape, k), labels.reshape(shape))


def backend_run(student, ids, logprobs, labels, backend_device, weight=1.0, **kw):
    """(output, student grad) after the backward of ``(loss * weight).sum()``."""
    backend, device = backend_device
    s = student.detach().to(device, copy=True).requires_grad_()
    y = None if labels is None else labels.to(device)
    out = sparse_distillation_loss(s, ids.to(device), logprobs.to(device), y, backend=backend, **kw)
    (out.loss * _weight(weight, out.loss)).sum().backward()
    return out, s.grad


def oracle_run(student, ids, logprobs, labels, weight=1.0, divergence="forward_kl", **kw):
    s64 = student.detach().double().requires_grad_()
    loss, stats = sparse_oracle(s64, ids, logprobs, labels, divergence_name=divergence, **kw)
    (loss * _weight(weight, loss).double()).sum().backward()
    return loss.detach(), stats, s64.grad


def _weight(weight, loss):
    if isinstance(weight, torch.Tensor):
        return weight.to(loss.device, loss.dtype)
    if loss.dim() == 0:
        return torch.tensor(weight, dtype=loss.dtype, device=loss.device)
    return torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)


def assert_matches(backend_device, case, dtype=torch.float32, weight=1.0, **kw):
    student, ids, logprobs, labels = case
    student = student.to(dtype)
    out, grad = backend_run(student, ids, logprobs, labels, backend_device, weight, **kw)
    loss, stats, grad64 = oracle_run(student, ids, logprobs, labels, weight, **kw)
    rtol, grad_rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.loss.detach().cpu().double(), loss, rtol=rtol, atol=1e-6)
    for name in ("soft", "hard", "teacher_ce", "agreement"):
        torch.testing.assert_close(getattr(out, name).cpu().double(), stats[name], rtol=rtol, atol=1e-6, equal_nan=True)
    assert int(out.num_tokens) == stats["num_tokens"]
    # A counted row whose soft term is +inf (a bucket with mass on one side only) gets a NaN gradient in every
    # column, the dense loss's convention; the oracle's autograd gives NaN there, or the finite parts' slope.
    grad, grad64 = grad.cpu().reshape(-1, grad.shape[-1]), grad64.reshape(-1, grad.shape[-1])
    row_kw = {**kw, "reduction": "none", "alpha": 1.0}
    soft_rows = oracle_run(student, ids, logprobs, labels, **row_kw)[0].reshape(-1)
    counted = torch.ones_like(soft_rows, dtype=torch.bool) if labels is None else labels.reshape(-1) != -100
    infinite = counted & (torch.isnan(grad64).any(-1) | (torch.isinf(soft_rows) & (kw.get("alpha", 1.0) > 0)))
    assert bool(torch.isnan(grad[infinite]).all())
    assert bool((grad[~counted] == 0).all())  # an ignored row gets exactly 0, whatever its logits hold
    assert_grad_close(grad[counted & ~infinite], grad64[counted & ~infinite], grad_rtol)
    return out, grad.reshape(student.shape)


@pytest.mark.parametrize(("tail", "divergence"), CASES)
@pytest.mark.parametrize(("temperature", "alpha"), [(1.0, 1.0), (2.0, 0.3), (1.0, 0.0)])
def test_matches_oracle(backend_device, tail, divergence, temperature, alpha):
    kw = {"tail": tail, "divergence": divergence, "temperature": temperature, "alpha": alpha}
    assert_matches(backend_device, make_case(), **kw)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_grad_output(backend_device, reduction):
    kw = {"tail": True, "divergence": "jsd", "beta": 0.3, "alpha": 0.6, "reduction": reduction}
    out, _ = assert_matches(backend_device, make_case(seed=3), weight=2.5, **kw)
    assert out.loss.shape == (() if reduction != "none" else SHAPE)


def test_padding_columns_and_whole_blocks(backend_device):
    # vocab 256 fills whole blocks (no masked tail block); the 16 padding columns get exactly 0
    case = make_case(vocab=256, width=272, seed=5)
    _, grad = assert_matches(backend_device, case, vocab_size=256, tail=True, temperature=2.0, alpha=0.5)
    assert bool((grad[..., 256:] == 0).all())


def test_several_gradient_programs_per_row(backend_device):
    """V = 2500: several statistics blocks, and (on Triton) gradient spans whose slots are written after."""
    assert_matches(backend_device, make_case(shape=(2,), vocab=2500, k=6, seed=6), tail=True, alpha=0.7)


def test_confident_student_tail_is_summed_not_subtracted(backend_device):
    """The student's tail holds ~1e-9: 1 - sum(q over the slots) in fp32 would be 0 or 6e-8, a wrong loss."""
    student, ids, logprobs, labels = make_case(seed=7)
    s = torch.full_like(student, -25.0)
    valid = ids >= 0
    s.reshape(-1, VOCAB).scatter_(
        1, ids.reshape(-1, SLOTS).clamp(min=0), torch.where(valid, 1.0, -25.0).reshape(-1, SLOTS)
    )
    case = (s, ids, logprobs, labels)
    out, _ = assert_matches(backend_device, case, tail=True)
    loss64 = oracle_run(*case, tail=True)[0]
    # The cancelling alternative, on the same fp32 inputs: its tail mass, hence its loss, are far off.
    q = torch.softmax(s.reshape(-1, VOCAB), -1)
    naive_tail = 1 - torch.where(valid.reshape(-1, SLOTS), q.gather(1, ids.reshape(-1, SLOTS).clamp(min=0)), 0).sum(-1)
    exact_tail = torch.softmax(s.reshape(-1, VOCAB).double(), -1).sum(-1) - torch.where(
        valid.reshape(-1, SLOTS),
        torch.softmax(s.reshape(-1, VOCAB).double(), -1).gather(1, ids.reshape(-1, SLOTS).clamp(min=0)),
        0,
    ).sum(-1)
    rows = valid.reshape(-1, SLOTS).any(-1)
    assert float(exact_tail[rows].max()) < 1e-8
    assert float(((naive_tail.double() - exact_tail) / exact_tail)[rows].abs().max()) > 0.5
    assert abs(float(out.loss.detach()) - float(loss64)) < 1e-5 * float(loss64)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tail_beyond_fp32_range(backend_device, temperature):
    """The tail 100/T nats below the slots: its mass (e^-100) underflows fp32 if shifted by the row's max.
    The loss and the tail columns' gradient (q_u / Q_tail times a finite factor) still match the oracle."""
    student, ids, logprobs, labels = make_case(seed=14)
    valid = (ids >= 0).reshape(-1, SLOTS)
    s = torch.randn(student.shape, generator=torch.Generator().manual_seed(15)).reshape(-1, VOCAB) - 100.0
    s.scatter_(1, ids.reshape(-1, SLOTS).clamp(min=0), torch.where(valid, 0.0, -100.0))
    case = (s.reshape(student.shape), ids, logprobs, labels)
    out, _ = assert_matches(backend_device, case, tail=True, temperature=temperature, alpha=0.5)
    assert math.isfinite(float(out.soft)) and float(out.soft) > 10


@pytest.mark.parametrize(("tail", "divergence"), CASES)
def test_non_finite_inputs(backend_device, tail, divergence):
    """A -inf student logit at a slot (forward KL +inf in that row), a -inf teacher log-probability (a slot of
    probability 0), logits of +-1e4, and a NaN logit in an ignored row (which counts for nothing)."""
    student, ids, logprobs, labels = make_case(seed=20)
    s, lp = student.reshape(-1, VOCAB).clone(), logprobs.reshape(-1, SLOTS).clone()
    s[0, ids.reshape(-1, SLOTS)[0, 2]] = -math.inf
    lp[3, 1] = -math.inf
    s[5] *= 5000
    s[4, 7] = math.nan  # row 4's label is ignore_index
    case = (s.reshape(student.shape), ids, lp.reshape(logprobs.shape), labels)
    out, grad = assert_matches(backend_device, case, tail=tail, divergence=divergence, reduction="none", alpha=0.7)
    assert bool((grad.reshape(-1, VOCAB)[4] == 0).all()) and float(out.loss.detach().reshape(-1)[4]) == 0


def test_all_rows_ignored_or_empty(backend_device):
    student, ids, logprobs, labels = make_case(seed=8)
    out, grad = backend_run(student, ids, logprobs, torch.full_like(labels, -100), backend_device, alpha=0.5)
    assert float(out.loss.detach()) == 0 and int(out.num_tokens) == 0 and bool((grad == 0).all())
    out, grad = backend_run(student, torch.full_like(ids, -1), logprobs, labels, backend_device, tail=True)
    assert float(out.loss.detach()) == 0 and bool((grad == 0).all()) and float(out.agreement) == 0


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_matches_projected_logits(backend_device, reduction):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(9)
    hidden, weight, bias = (
        torch.randn(2, 3, 16, generator=gen),
        torch.randn(VOCAB, 16, generator=gen) / 2,
        torch.randn(VOCAB, generator=gen),
    )
    _, ids, logprobs, labels = make_case(seed=9)
    kw = {"tail": True, "divergence": "reverse_kl", "temperature": 2.0, "alpha": 0.4, "reduction": reduction}
    kw["backend"] = backend
    leaves = [x.to(device, copy=True).requires_grad_() for x in (hidden, weight, bias)]
    out = fused_linear_sparse_distillation_loss(
        leaves[0],
        leaves[1],
        ids.to(device),
        logprobs.to(device),
        labels.to(device),
        student_bias=leaves[2],
        chunk_size=4,
        **kw,
    )
    (out.loss * _weight(2.0, out.loss)).sum().backward()
    refs = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    ref = sparse_distillation_loss(refs[0] @ refs[1].T + refs[2], ids, logprobs, labels, **{**kw, "backend": "torch"})
    (ref.loss * _weight(2.0, ref.loss)).sum().backward()
    torch.testing.assert_close(out.loss.detach().cpu(), ref.loss.detach(), rtol=1e-5, atol=1e-6)
    for leaf, reference in zip(leaves, refs, strict=True):
        torch.testing.assert_close(leaf.grad.cpu(), reference.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_reductions_on_torch(reduction):
    gen = torch.Generator().manual_seed(10)
    hidden, weight = (
        torch.randn(6, 8, generator=gen, dtype=torch.float64),
        torch.randn(VOCAB, 8, generator=gen, dtype=torch.float64),
    )
    _, ids, logprobs, labels = make_case(shape=(6,), seed=10)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_linear_sparse_distillation_loss(
        h, w, ids, logprobs, labels, tail=True, alpha=0.5, reduction=reduction, chunk_size=4
    )
    (out.loss * _weight(1.7, out.loss)).sum().backward()
    h64, w64 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = sparse_oracle(h64 @ w64.T, ids, logprobs, labels, tail=True, alpha=0.5, reduction=reduction)
    (loss * _weight(1.7, loss)).sum().backward()
    torch.testing.assert_close(out.loss.detach(), loss.detach())
    torch.testing.assert_close(h.grad, h64.grad)
    torch.testing.assert_close(w.grad, w64.grad)


@pytest.mark.parametrize("chunk_size", [2, None])
def test_fused_linear_under_autocast_gives_fp32_parameters_fp32_gradients(chunk_size):
    # What a bf16-mixed Trainer hands OfflineDistillation: fp32 parameters with autocast on. The matmuls take
    # bf16 copies, as nn.Linear's would; the gradients come back in fp32.
    gen = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(6, 16, generator=gen), torch.randn(VOCAB, 16, generator=gen) / 2
    bias = torch.randn(VOCAB, generator=gen)
    _, ids, logprobs, labels = make_case(shape=(6,), seed=12)
    kw = {"tail": True, "divergence": "jsd", "temperature": 2.0, "alpha": 0.5}
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_linear_sparse_distillation_loss(
            leaves[0], leaves[1], ids, logprobs, labels, student_bias=leaves[2], chunk_size=chunk_size, **kw
        )
    out.loss.backward()
    assert [x.grad.dtype for x in leaves] == [torch.float32] * 3
    # The reference: the float64 oracle on the exact logits of the bf16 copies (the bias stays fp32, the chunk
    # logits are fp32, as in the dense fused-linear form), chained by hand.
    h, w, b = hidden.to(torch.bfloat16).double(), weight.to(torch.bfloat16).double(), bias.double()
    loss, _, grad_logits = oracle_run(h @ w.T + b, ids, logprobs, labels, **kw)
    torch.testing.assert_close(out.loss.detach().double(), loss, rtol=1e-6, atol=1e-7)
    expected = (grad_logits @ w, grad_logits.T @ h, grad_logits.sum(0))
    for leaf, want, name in zip(leaves, expected, ("dH", "dW", "db"), strict=True):
        assert_grad_close(leaf.grad, want, TOLERANCES[torch.bfloat16][1], what=name)


def linear_case(seed=0, n=9, vocab=1000, hidden=32, k=64):
    """bf16 hidden states, weight and bias whose logits are a few units (std about 6, as a trained head's), and
    ``make_case``'s teacher of the exact logits: 64 slots of mass 0.8, rows 1 and 2 with empty slots."""
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * (6 / math.sqrt(hidden))
    b = torch.randn(vocab, generator=gen) * 0.5
    tensors = [x.to(torch.bfloat16) for x in (h, w, b)]
    logits = (tensors[0].double() @ tensors[1].double().T + tensors[2].double()).float()
    return (tensors, *make_case(shape=(n,), vocab=vocab, k=k, seed=seed, student=logits)[1:])


@pytest.mark.parametrize(("tail", "divergence"), CASES)
@pytest.mark.parametrize(("temperature", "alpha", "reduction"), [(1.0, 1.0, "mean"), (2.0, 0.5, "none")])
def test_fused_linear_bf16_inputs_lose_only_their_own_rounding(
    backend_device, tail, divergence, temperature, alpha, reduction
):
    # As the dense form's test of that name, with its bound: the chunk logits of bf16 inputs are fp32, so the loss
    # matches float64 on the same bf16 values to 1e-6 (measured: 2e-7), and the gradients lose only the bf16
    # rounding of the logit gradient and of dH, dW, db: at most 5.9e-3 of the largest entry (8.1e-3 under the
    # interpreter, which truncates to bf16). With bf16 chunk logits (before): the loss off by 2e-3 to 9e-3, the
    # gradients by 1.2e-2 (jsd, T=2) to 3.6e-2 (reverse KL, T=1).
    kw = {"tail": tail, "divergence": divergence, "temperature": temperature, "alpha": alpha, "reduction": reduction}
    out, loss, errors = run_linear_bf16(backend_device, **kw)
    torch.testing.assert_close(out.loss.detach().cpu().double(), loss, rtol=1e-6, atol=1e-7)
    assert max(errors.values()) < 1e-2, errors


def run_linear_bf16(backend_device, **kw):
    """The fused-linear loss of ``linear_case`` and its float64 reference: (output, reference loss, the largest
    error over the largest entry of dH, dW and db), after the backward of the loss weighted by ``_weight(2.0)``."""
    backend, device = backend_device
    tensors, ids, logprobs, labels = linear_case()
    ref = [x.double().requires_grad_() for x in tensors]
    options = {k: v for k, v in kw.items() if k != "divergence"}
    divergence = kw.get("divergence", "forward_kl")
    loss, _ = sparse_oracle(ref[0] @ ref[1].T + ref[2], ids, logprobs, labels, divergence_name=divergence, **options)
    (loss * _weight(2.0, loss)).sum().backward()
    leaves = [x.to(device, copy=True).requires_grad_() for x in tensors]
    h, w, b = leaves
    y = labels.to(device)
    out = fused_linear_sparse_distillation_loss(
        h, w, ids.to(device), logprobs.to(device), y, student_bias=b, chunk_size=4, backend=backend, **kw
    )
    (out.loss * _weight(2.0, out.loss)).sum().backward()
    assert all(x.grad.dtype == torch.bfloat16 for x in leaves)
    errors = {
        name: float((x.grad.cpu().double() - r.grad).abs().max() / r.grad.abs().max())
        for name, x, r in zip(("dH", "dW", "db"), leaves, ref, strict=True)
    }
    return out, loss.detach(), errors


def test_fused_linear_without_fp32_output_matmul_bf16_logits_with_a_warning(backend_device, monkeypatch):
    # A device without fp32-output GEMMs (CUDA in torch < 2.8), as the dense form's test of that name: the chunk
    # logits stay bf16 (the gradient written over them), with the dense form's warning and its bounds.
    from lit_distill.kernels import linear_plan

    linear_plan._warn_half_logits.cache_clear()
    monkeypatch.setattr(linear_plan, "fp32_output_matmul", lambda device, dtype: False)
    monkeypatch.setattr(linear_plan, "UPCAST_DEVICES", ())
    try:
        with pytest.warns(UserWarning, match="chunk logits are computed in torch.bfloat16"):
            out, loss, errors = run_linear_bf16(backend_device, tail=True, divergence="reverse_kl", alpha=0.5)
    finally:
        linear_plan._warn_half_logits.cache_clear()  # the next caller on a patched device is warned again
    torch.testing.assert_close(out.loss.detach().cpu().double(), loss, rtol=1e-3, atol=1e-5)
    assert max(errors.values()) < 6e-2, errors


def test_fused_linear_plan_counts_fp32_logits():
    # The benchmark's shape (N=8192, H=4096, V=128256, bf16, CUDA) in the dense form's budget: fp32 chunk logits
    # and the bf16 logit gradient, 6 bytes a logit; the PyTorch path writes the gradient over fp32 logits.
    from lit_distill.kernels.linear_plan import MEMORY_BUDGET_BYTES, Head, choose_chunk_size, planned_extra_bytes
    from lit_distill.kernels.sparse_linear import plan_keywords

    bf16 = Head(128256, 4096, torch.bfloat16, torch.bfloat16, torch.float32, bias=False, grad=True)
    fp32 = bf16._replace(dtype=torch.float32, matmul_dtype=torch.float32)
    for side, triton, gradient in ((bf16, True, 2), (bf16, False, 2), (fp32, True, 0), (fp32, False, 0)):
        kw = plan_keywords(side, True, device_type="cuda", triton=triton)
        chunk = choose_chunk_size(8192, side, **kw)
        plan = planned_extra_bytes(8192, chunk, side, **kw)
        assert plan["logits"] == chunk * 128256 * 4 and plan.get("logit gradients", 0) == chunk * 128256 * gradient
        assert chunk % 64 == 0 and sum(plan.values()) <= MEMORY_BUDGET_BYTES["cuda"] + 8192 * 256, (chunk, plan)
    assert choose_chunk_size(8192, bf16, **plan_keywords(bf16, False, device_type="cuda", triton=True)) == 1664


MEMORY_WORKER = """
import json, sys, torch
from bench import harness
from lit_distill import fused_linear_sparse_distillation_loss as loss_fn
from lit_distill.kernels.linear_plan import choose_chunk_size, head, planned_extra_bytes
from lit_distill.kernels.sparse_linear import plan_keywords
torch.set_num_threads(2)
dtype, temperature = getattr(torch, sys.argv[1]), float(sys.argv[2])
gen = torch.Generator().manual_seed(0)
h = torch.randn(4096, 256, generator=gen).to(dtype).requires_grad_()
w = (torch.randn(32000, 256, generator=gen) / 8).to(dtype).requires_grad_()
logprobs, ids = torch.log_softmax(torch.randn(4096, 32000, generator=gen), -1).topk(64, -1)
labels = torch.randint(0, 32000, (4096,), generator=gen)
kw = {"tail": True, "divergence": "reverse_kl", "temperature": temperature, "alpha": 0.5}
for step in range(2):  # the first warms up the libraries' buffers
    h.grad = w.grad = None
    base = harness._current_rss()
    harness._reset_peak_rss()
    loss_fn(h, w, ids, logprobs, labels, **kw).loss.backward()
extra = harness._peak_rss() - base - sum(x.numel() * x.element_size() for x in (h, w))
side = head(w, None, None, True)
plan = plan_keywords(side, temperature != 1.0, device_type="cpu", triton=False)
chunk = choose_chunk_size(4096, side, **plan)
planned = sum(planned_extra_bytes(4096, chunk, side, **plan).values())
print(json.dumps({"chunk": chunk, "extra": extra, "planned": planned}))
"""


@pytest.mark.slow  # two processes of about 25 s
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
@pytest.mark.parametrize(("dtype", "temperature", "chunk"), [("float32", 1.0, 1408), ("bfloat16", 2.0, 1024)])
def test_fused_linear_memory_is_as_planned(dtype, temperature, chunk):
    # 4096 tokens at V=32000 in the CPU budget's chunks: fp32 logits (the gradient written over them, or apart
    # in bf16) and the PyTorch path's workspace (a second buffer at T != 1). Measured 201.3 MiB (fp32, T=1)
    # and 251.8 MiB (bf16, T=2) against plans of 204.9 and 252.5 MiB.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}  # RSS follows live memory
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_WORKER, dtype, str(temperature)],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["chunk"] == chunk
    assert abs(result["extra"] - result["planned"]) <= 0.03 * result["planned"] + (4 << 20), result


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(backend_device, dtype):
    assert_matches(backend_device, make_case(seed=11), dtype=dtype, tail=True, temperature=2.0, alpha=0.5)


def test_no_rows(backend_device):
    backend, device = backend_device
    s = torch.zeros(0, VOCAB, device=device, requires_grad=True)
    ids, logprobs = torch.zeros(0, SLOTS, dtype=torch.long, device=device), torch.zeros(0, SLOTS, device=device)
    out = sparse_distillation_loss(s, ids, logprobs, tail=True, backend=backend)
    out.loss.backward()
    assert float(out.loss.detach()) == 0 and int(out.num_tokens) == 0 and s.grad.shape == s.shape


@pytest.mark.parametrize(("tail", "divergence"), CASES)
def test_gradcheck_float64(tail, divergence):
    student, ids, logprobs, labels = make_case(shape=(4,), vocab=12, k=4, seed=12)
    ids[1, 1] = -1
    kw = {"tail": tail, "divergence": divergence, "temperature": 2.0, "alpha": 0.5, "backend": "torch"}
    s = student.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sparse_distillation_loss(x, ids, logprobs, labels, **kw).loss, (s,))


def _fuzz_case(seed: int):
    gen = torch.Generator().manual_seed(seed)

    def draw(options):
        return options[int(torch.randint(len(options), (), generator=gen))]

    vocab = int(torch.randint(5, 400, (), generator=gen))
    k = int(torch.randint(1, min(vocab, 20) + 1, (), generator=gen))
    tail, divergence = draw(CASES)
    case = make_case(
        shape=(int(torch.randint(1, 9, (), generator=gen)),),
        vocab=vocab,
        k=k,
        seed=seed + 100,
        scale=draw([0.5, 2.0, 8.0]),
        mass=draw([0.3, 0.9, 1.0]),
    )
    kw = {
        "tail": tail,
        "divergence": divergence,
        "beta": draw([0.0, 0.2, 0.5, 1.0]),
        "temperature": draw([0.5, 1.0, 3.0]),
        "t2_scaling": draw([True, False]),
        "alpha": draw([0.0, 0.5, 1.0]),
        "reduction": draw(["mean", "sum", "none"]),
    }
    return case, kw


@pytest.mark.parametrize("seed", range(50))
def test_fuzz_torch(seed):
    case, kw = _fuzz_case(seed)
    assert_matches(("torch", "cpu"), case, **kw)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter cases run where there is no GPU")
@pytest.mark.parametrize("seed", range(4))
def test_fuzz_interpreter(seed):
    case, kw = _fuzz_case(seed)
    assert_matches(("triton", "cpu"), case, **kw)


def test_sampled_targets_are_unbiased():
    """Targets drawn as ``samples`` tokens from p, stored as distinct ids with log(count / samples): the student
    gradient averaged over draws is the dense forward-KL gradient q - p, within 4 standard errors."""
    n, vocab, samples, draws = 3, 40, 6, 400
    gen = torch.Generator().manual_seed(13)
    student = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    p = torch.softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 1.5, -1)
    grads = []
    for _ in range(draws):
        drawn = torch.multinomial(p, samples, replacement=True, generator=gen)
        counts = torch.zeros(n, vocab, dtype=torch.float64).scatter_add_(
            1, drawn, torch.ones_like(drawn, dtype=torch.float64)
        )
        top, ids = counts.topk(samples, -1)  # the distinct ids first; the rest are counts of 0: empty slots
        ids = torch.where(top > 0, ids, -1)
        s = student.clone().requires_grad_()
        sparse_distillation_loss(s, ids, (top / samples).log(), reduction="sum").loss.backward()
        grads.append(s.grad)
    grads = torch.stack(grads)
    s = student.clone().requires_grad_()
    distillation_loss(s, p.log(), reduction="sum").loss.backward()
    error = (grads.mean(0) - s.grad).abs()
    # From the per-draw gradients; floored by the known variance p (1 - p) / samples of a count's share, for
    # the rare tokens that no draw picked (whose empirical variance is 0).
    standard_error = torch.maximum(grads.std(0), (p * (1 - p) / samples).sqrt()) / math.sqrt(draws)
    assert bool((error <= 4 * standard_error).all()), float((error / standard_error).max())
    assert float(standard_error.max()) < 0.05  # the check has teeth: a biased target would exceed it


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            {"ids": lambda ids: ids.masked_fill(ids == ids[0, 0], -2)},
            ValueError,
            r"teacher id -2 is outside \[-1, 300\)",
        ),
        ({"ids": lambda ids: torch.where(ids == ids[0, 0], 300, ids)}, ValueError, r"outside \[-1, 300\)"),
        ({"ids": lambda ids: torch.cat([ids[..., :1], ids[..., :-1]], -1)}, ValueError, "repeat token"),
        ({"ids": lambda ids: ids.float()}, TypeError, "teacher_ids must be an integer tensor"),
        ({"ids": lambda ids: ids[..., :-1]}, ValueError, "must have the same shape"),
        ({"ids": lambda ids: ids[:1], "logprobs": lambda lp: lp[:1]}, ValueError, "leading shape"),
        ({"logprobs": lambda lp: lp.long()}, TypeError, "teacher_logprobs must be floating point"),
        ({"kw": {"divergence": "reverse_kl"}}, ValueError, "need the tail bucket: pass tail=True"),
        ({"kw": {"tail": True, "divergence": "skew_forward_kl"}}, ValueError, "not defined for sparse teachers"),
        ({"kw": {"alpha": 0.5}, "labels": None}, ValueError, "labels is None"),
        ({"kw": {"vocab_size": 301}}, ValueError, "larger than the student's vocabulary"),
        ({"kw": {"tail": 1}}, TypeError, "tail must be a bool"),
    ],
)
def test_bad_input(change, error, match):
    student, ids, logprobs, labels = make_case()
    ids = change.get("ids", lambda x: x)(ids)
    logprobs = change.get("logprobs", lambda x: x)(logprobs)
    labels = change.get("labels", labels)
    with pytest.raises(error, match=match):
        sparse_distillation_loss(student, ids, logprobs, labels, backend="torch", **change.get("kw", {}))


@pytest.mark.slow  # six subprocesses
def test_bench_script_writes_its_table(tmp_path):
    import csv

    from bench import sparse as bench_sparse

    args = ["--rows", "8", "--vocab", "300", "--slots", "4", "--reps", "1", "--device", "cpu", "--out", str(tmp_path)]
    assert bench_sparse.main(args) == 0
    with open(tmp_path / "sparse.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == ["dense-torch", "sparse-torch", "sparse-tail"]
    assert all(float(r["ms"]) > 0 and int(r["extra_bytes"]) >= 0 for r in rows)
