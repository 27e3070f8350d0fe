"""The cross-tokenizer loss: equal to soft-label distillation with one tokenizer on both sides, and against a float64
reference of its own definition (written out with loops, sharing no code with the package) for two tokenizers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import divergence as oracle_divergence
from oracle import sparse_oracle

from lit_distill.data.cross_tokenizer.binning import binned_logits
from lit_distill.data.cross_tokenizer.fused import fused_cross_tokenizer_loss
from lit_distill.data.cross_tokenizer.loss import Pairs, cross_tokenizer_loss
from lit_distill.data.cross_tokenizer.vocab_map import VocabularyMap
from lit_distill.kernels import distillation_loss
from lit_distill.kernels.sparse import sparse_distillation_loss

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "tvd")


def _map(teacher_to_student, student_size: int, teacher_tokens: int | None = None) -> VocabularyMap:
    ids = np.asarray(teacher_to_student, dtype=np.int64)
    return VocabularyMap(ids, ids >= 0, student_size, teacher_tokens or len(ids), "t", "s")


def _identity_case(seed=0, b=2, length=9, vocab=37):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, length, vocab, generator=g, dtype=torch.float64) * 2
    t = torch.randn(b, length, vocab, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(vocab, (b, length), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    positions = torch.arange(length).expand(b, length)
    chunks = torch.where(labels != -100, positions, -1)  # one token per chunk: every position is a boundary
    pairs = Pairs(chunks.clone(), chunks.clone(), chunks.clone(), chunks.clone())
    return s.requires_grad_(), t, labels, pairs


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize(("alpha", "temperature"), [(1.0, 1.0), (0.3, 2.0)])
def test_same_tokenizer_is_soft_label_distillation(divergence, alpha, temperature):
    """Identity map, every position a boundary, dense binning: the loss and gradient are soft-label's."""
    s, t, labels, pairs = _identity_case()
    keywords = dict(divergence=divergence, temperature=temperature, alpha=alpha, reduction="sum", backend="torch")
    ours = cross_tokenizer_loss(s, t, labels, labels, pairs, _map(np.arange(37), 37), top_k=None, **keywords)
    (grad,) = torch.autograd.grad(ours.loss, s)
    reference = distillation_loss(s, t, labels, **keywords)
    (expected,) = torch.autograd.grad(reference.loss, s)
    torch.testing.assert_close(ours.loss, reference.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.soft, reference.soft, rtol=1e-12, atol=0)
    assert ours.agreement == reference.agreement and ours.num_tokens == reference.num_tokens
    assert ours.boundaries == reference.num_tokens


@pytest.mark.parametrize("divergence", ("forward_kl", "reverse_kl", "tvd"))
def test_same_tokenizer_top_k_is_the_sparse_loss_on_the_teachers_top_k(divergence):
    s, t, labels, pairs = _identity_case(seed=1)
    keywords = dict(divergence=divergence, temperature=2.0, alpha=0.5, reduction="sum", backend="torch")
    ours = cross_tokenizer_loss(s, t, labels, labels, pairs, _map(np.arange(37), 37), top_k=5, **keywords)
    values, ids = torch.log_softmax(t / 2.0, -1).topk(5, -1)
    reference = sparse_distillation_loss(s, ids, values, labels, tail=True, **keywords)
    torch.testing.assert_close(ours.loss, reference.loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(*(torch.autograd.grad(x.loss, s)[0] for x in (ours, reference)), rtol=1e-9, atol=1e-12)


def test_binned_logits_bin_the_distribution():
    """softmax(m) equals the teacher's probabilities summed per student token; empty bins are -inf."""
    g = torch.Generator().manual_seed(2)
    t = torch.randn(3, 10, generator=g, dtype=torch.float64) * 3
    t[0, 4] = -math.inf  # a banned token
    mapping = [0, 0, 1, 3, 3, 3, 2, -1, 1, 0]
    m = binned_logits(t, _map(mapping, 5), 6)
    p = torch.softmax(t, -1)
    expected = torch.zeros(3, 6, dtype=torch.float64)
    for i, j in enumerate(mapping):
        if j >= 0:
            expected[:, j] += p[:, i]
    expected /= expected.sum(-1, keepdim=True)  # the DROP token's mass leaves the distribution
    torch.testing.assert_close(torch.softmax(m, -1), expected, rtol=1e-12, atol=1e-15)
    assert torch.isinf(m[:, 4:]).all()
    # a map that bins no two tokens together copies the logits
    copied = binned_logits(t, _map([1, 0, 2, 3, 4, 5, 6, 7, 8, 9], 10), 11)
    assert torch.equal(copied[:, [1, 0, *range(2, 10)]], t) and torch.isinf(copied[:, 10]).all()


# ------------------------------------------------------------------- two tokenizers, float64 reference
def _cross_case(seed=3):
    """A batch of 2 rows: student width 32 (30 real), teacher width 40 (36 real, 4 padded), a binning map with
    collisions, boundary pairs and chunks (group sizes 1-3 on each side), a prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    b, s_len, t_len, vs, vt = 2, 12, 14, 32, 40
    mapping = np.concatenate([rng.integers(0, 30, 36), np.full(4, -1)])
    s = (torch.randn(b, s_len, vs, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(b, t_len, vt, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(30, (b, s_len), generator=g)
    teacher_targets = torch.randint(36, (b, t_len), generator=g)
    labels[1, :2] = -100
    labels[0, -1] = -100
    ps, pt = torch.full((b, 8), -1), torch.full((b, 8), -1)
    sc, tc = torch.full((b, s_len), -1), torch.full((b, t_len), -1)
    for row in range(b):
        i = j = 0
        for chunk in range(8):
            di, dj = int(rng.integers(1, 3)), int(rng.integers(1, 4))
            if i + di > s_len or j + dj > t_len:
                break
            sc[row, i : i + di], tc[row, j : j + dj] = chunk, chunk
            ps[row, chunk], pt[row, chunk] = i, j  # a pair predicts the chunk that starts there
            i, j = i + di, j + dj
    sc = torch.where(labels != -100, sc, -1)  # a chunk with an uncounted target is not listed
    ps = torch.where((ps >= 0) & (labels.gather(1, ps.clamp(min=0)) != -100), ps, -1)
    pairs = Pairs(ps, torch.where(ps >= 0, pt, -1), sc, tc)
    return s, t, labels, teacher_targets, pairs, _map(mapping, 30, teacher_tokens=36)


def _byte_tables(seed=3):
    """Bytes per token id: student (30 ids) and teacher (36 ids), 1 to 4 each, a few zero-width."""
    rng = np.random.default_rng(seed)
    student, teacher = rng.integers(1, 5, 30), rng.integers(1, 5, 36)
    student[[0, 7]], teacher[[0, 11]] = 0, 0
    return torch.from_numpy(student), torch.from_numpy(teacher)


def _moved(binned, row, ps, pt, t, labels, targets, vmap, temperature, tables):
    """The binned teacher at a pair after the label move: the teacher's tempered probability of its next tokens up
    to the first that ends at or past the label's bytes (at most what the bin of its first next token holds) moves
    from that bin to the label."""
    label = int(labels[row, ps])
    source = int(vmap.teacher_to_student[targets[row, pt]])
    if label < 0 or source < 0 or source == label:
        return binned, False
    read, last = 0, pt
    while last < t.shape[1]:
        read += int(tables[1][targets[row, last]])
        if read >= int(tables[0][label]):
            break
        last += 1
    if last >= t.shape[1]:
        return binned, False
    logprobs = [F.log_softmax(t[row, q, :36] / temperature, -1)[targets[row, q]] for q in range(pt, last + 1)]
    mass = torch.minimum(torch.exp(sum(logprobs)), binned[source])
    binned = binned.clone()
    binned[source] -= mass
    binned[label] += mass
    return binned, True


def _reference(
    s, t, labels, teacher_targets, pairs, vmap, *, divergence, temperature, alpha, weights, uld_k, unpaired_labels=True
):
    """The definition in plain loops, float64."""
    w_b, w_c, w_u = weights
    T = temperature
    soft = chunk = uld = 0.0
    hard = unpaired = 0.0
    for row in range(s.shape[0]):
        paired = {int(p) for p in pairs.student[row] if p >= 0}
        for p in range(s.shape[1]):
            if labels[row, p] != -100:
                ce = -F.log_softmax(s[row, p, :30], -1)[labels[row, p]]
                hard = hard + ce
                if p not in paired and unpaired_labels:  # no teacher distribution here: the label stands in
                    unpaired = unpaired + ce
        for k in range(pairs.student.shape[1]):
            ps, pt = int(pairs.student[row, k]), int(pairs.teacher[row, k])
            if ps < 0:
                continue
            p_1 = torch.softmax(t[row, pt, :36], -1)  # binned at T=1, then tempered in the student's space
            binned = torch.zeros(30, dtype=torch.float64)
            for i in range(36):
                binned[vmap.teacher_to_student[i]] += p_1[i]
            binned, _ = _moved(binned, row, ps, pt, t, labels, teacher_targets, vmap, 1.0, _byte_tables())
            soft = soft + oracle_divergence(divergence, s[row, ps, :30] / T, binned.log() / T) * T**2
            p_t = torch.softmax(t[row, pt, :36] / T, -1)
            q = torch.softmax(s[row, ps, :30] / T, -1)
            uld = (
                uld
                + (q.sort(descending=True).values[:uld_k] - p_t.sort(descending=True).values[:uld_k]).abs().sum() * T**2
            )
        for c in range(int(pairs.student_chunk[row].max()) + 1):
            s_pos = [p for p in range(s.shape[1]) if pairs.student_chunk[row, p] == c]
            t_pos = [p for p in range(t.shape[1]) if pairs.teacher_chunk[row, p] == c]
            if not s_pos or not t_pos:
                continue
            ls = sum(F.log_softmax(s[row, p, :30], -1)[labels[row, p]] for p in s_pos)
            lt = sum(F.log_softmax(t[row, p, :36], -1)[teacher_targets[row, p]] for p in t_pos)
            a, bb = torch.exp(lt.clamp(max=-1e-6)), torch.exp(ls.clamp(max=-1e-6))
            chunk = chunk + a * torch.log(a / bb) + (1 - a) * torch.log((1 - a) / (1 - bb))
    soft_sum = w_b * soft + w_c * chunk + w_u * uld + unpaired
    return alpha * soft_sum + (1 - alpha) * hard if alpha < 1 else soft_sum


@pytest.mark.parametrize("divergence", ("forward_kl", "skew_reverse_kl", "jsd"))
@pytest.mark.parametrize(
    ("alpha", "temperature", "weights"), [(1.0, 1.0, (1.0, 0.0, 0.0)), (0.4, 2.0, (1.0, 0.5, 0.3))]
)
@pytest.mark.parametrize("unpaired_labels", (True, False))
def test_two_tokenizers_match_a_float64_reference(divergence, alpha, temperature, weights, unpaired_labels):
    s, t, labels, targets, pairs, vmap = _cross_case()
    paired = torch.zeros_like(labels, dtype=torch.bool)
    for row in range(labels.shape[0]):
        paired[row, pairs.student[row][pairs.student[row] >= 0]] = True
    assert ((labels != -100) & ~paired).any()  # the case has counted positions inside chunks
    out = cross_tokenizer_loss(
        s, t, labels, targets, pairs, vmap, top_k=None, boundary_weight=weights[0], chunk_weight=weights[1],
        uld_weight=weights[2], uld_top_k=6, divergence=divergence, temperature=temperature, alpha=alpha,
        vocab_size=30, backend="torch", byte_lengths=_byte_tables(), unpaired_labels=unpaired_labels,
    )  # fmt: skip
    expected = _reference(
        s, t, labels, targets, pairs, vmap, divergence=divergence, temperature=temperature, alpha=alpha,
        weights=weights, uld_k=6, unpaired_labels=unpaired_labels,
    )  # fmt: skip
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(out.loss, s)
    (ref_grad,) = torch.autograd.grad(expected, s)
    assert (grad - ref_grad).norm() / ref_grad.norm() < 1e-9
    assert grad[..., 30:].abs().max() == 0  # the student head's padding learns nothing
    assert out.num_tokens == (labels != -100).sum() and out.boundaries == (pairs.student >= 0).sum()


@pytest.mark.parametrize("divergence", ("forward_kl", "reverse_kl", "tvd"))
def test_two_tokenizers_top_k_matches_the_sparse_oracle_on_independently_binned_slots(divergence):
    s, t, labels, targets, pairs, vmap = _cross_case(seed=4)
    out = cross_tokenizer_loss(
        s, t, labels, targets, pairs, vmap, top_k=4, divergence=divergence, temperature=1.5, alpha=1.0,
        vocab_size=30, backend="torch", byte_lengths=_byte_tables(), unpaired_labels=False,
    )  # fmt: skip
    rows, ks = torch.nonzero(pairs.student >= 0, as_tuple=True)
    p = torch.softmax(t[rows, pairs.teacher[rows, ks], :36], -1).numpy()
    binned = np.zeros((len(rows), 30))
    np.add.at(binned, (np.arange(len(rows))[:, None], vmap.teacher_to_student[None, :36]), p)
    moves = 0
    for n, (row, k) in enumerate(zip(rows.tolist(), ks.tolist(), strict=True)):
        ps, pt = int(pairs.student[row, k]), int(pairs.teacher[row, k])
        after, did = _moved(torch.from_numpy(binned[n]), row, ps, pt, t, labels, targets, vmap, 1.0, _byte_tables())
        binned[n], moves = after.detach().numpy(), moves + did
    assert moves > 0  # the case has labels longer than the teacher's next token
    binned = binned ** (1 / 1.5)  # tempered after binning
    binned /= binned.sum(-1, keepdims=True)
    ids = np.argsort(-binned, -1, kind="stable")[:, :4]
    logprobs = np.log(np.take_along_axis(binned, ids, -1))
    student = s[rows, pairs.student[rows, ks]]
    expected, _ = sparse_oracle(
        student, torch.from_numpy(ids), torch.from_numpy(logprobs), labels[rows, pairs.student[rows, ks]], tail=True,
        divergence_name=divergence, temperature=1.5, vocab_size=30, reduction="sum",
    )  # fmt: skip
    torch.testing.assert_close(out.loss, expected, rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(out.loss, s)
    (ref_grad,) = torch.autograd.grad(expected, s)
    assert (grad - ref_grad).norm() / ref_grad.norm() < 1e-9


def test_dense_reverse_kl_with_empty_bins_is_refused():
    s, t, labels, targets, pairs, vmap = _cross_case()
    with pytest.raises(ValueError, match=r"leaves .* of the student's 30 tokens empty"):
        cross_tokenizer_loss(s, t, labels, targets, pairs, vmap, top_k=None, divergence="reverse_kl", vocab_size=30)


def test_chunk_term_vanishes_when_the_chunk_likelihoods_agree():
    """A student whose chunk likelihoods equal the teacher's has a chunk term of 0; moving one changes it."""
    s, t, labels, targets, pairs, vmap = _cross_case(seed=5)
    keywords = dict(
        top_k=None, boundary_weight=0.0, chunk_weight=1.0, vocab_size=30, backend="torch", unpaired_labels=False
    )
    out = cross_tokenizer_loss(s, t, labels, targets, pairs, vmap, **keywords)
    assert out.chunk > 0
    # one token per chunk, identical sides: the same log-likelihoods give a binary KL of 0
    same = Pairs(pairs.student, pairs.student, pairs.student_chunk, pairs.student_chunk)
    wide = torch.cat([s.detach(), torch.full((*s.shape[:-1], 8), -1e9, dtype=s.dtype)], -1)
    out = cross_tokenizer_loss(
        s, wide, labels, labels.clamp(min=0), same, _map(np.r_[np.arange(30), [-1] * 10], 30, 30), **keywords
    )
    assert out.loss.abs() < 1e-9


def test_nothing_counted_gives_zero_loss_and_gradient():
    s, t, labels, targets, pairs, vmap = _cross_case()
    labels = torch.full_like(labels, -100)
    out = cross_tokenizer_loss(
        s, t, labels, targets, Pairs(*(torch.full_like(x, -1) for x in pairs)), vmap, top_k=4, chunk_weight=1.0,
        uld_weight=1.0, alpha=0.5, vocab_size=30, reduction="mean", backend="torch",
    )  # fmt: skip
    (grad,) = torch.autograd.grad(out.loss, s)
    assert out.loss == 0 and grad.abs().max() == 0 and not torch.isnan(grad).any()


def test_bad_arguments_are_named():
    s, t, labels, targets, pairs, vmap = _cross_case()
    with pytest.raises(ValueError, match="top_k=0"):
        cross_tokenizer_loss(s, t, labels, targets, pairs, vmap, top_k=0)
    with pytest.raises(ValueError, match="chunk_weight=-1"):
        cross_tokenizer_loss(s, t, labels, targets, pairs, vmap, chunk_weight=-1)
    with pytest.raises(ValueError, match="the vocabulary map's student has 30 tokens, the student's logits 20"):
        cross_tokenizer_loss(s[..., :20], t, labels.clamp(max=19), targets, pairs, vmap)
    with pytest.raises(ValueError, match="teacher_vocab_size"):
        cross_tokenizer_loss(s, t[..., :39], labels, targets, pairs, vmap)


@pytest.mark.parametrize(("divergence", "alpha", "unpaired_labels"), [("forward_kl", 0.4, True), ("tvd", 1.0, False)])
def test_the_fused_path_from_hidden_states_is_the_loss_on_their_logits(divergence, alpha, unpaired_labels):
    """float64, a head wider than the vocabulary, labels longer than the teacher's next token (moves), tokens inside
    chunks: hidden states and head through the fused-linear kernel give the loss and gradients of their logits."""
    _, t, labels, targets, pairs, vmap = _cross_case(seed=4)
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(*labels.shape, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(32, 8, generator=g, dtype=torch.float64, requires_grad=True)
    keywords = dict(
        top_k=4, divergence=divergence, temperature=1.5, alpha=alpha, vocab_size=30, backend="torch",
        byte_lengths=_byte_tables(), unpaired_labels=unpaired_labels,
    )  # fmt: skip
    fused = fused_cross_tokenizer_loss(hidden, weight, None, t, labels, targets, pairs, vmap, chunk_size=5, **keywords)
    whole = cross_tokenizer_loss(hidden @ weight.T, t, labels, targets, pairs, vmap, teacher_ce=False, **keywords)
    torch.testing.assert_close(fused.loss, whole.loss, rtol=1e-9, atol=1e-12)
    for name in ("soft", "hard", "agreement", "num_tokens", "boundaries"):
        torch.testing.assert_close(getattr(fused, name), getattr(whole, name).to(getattr(fused, name).dtype))
    grads = torch.autograd.grad(fused.loss, (hidden, weight))
    expected = torch.autograd.grad(whole.loss, (hidden, weight))
    for got, want in zip(grads, expected, strict=True):  # the fused kernel's logit gradient is fp32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_fused_path_with_nothing_counted_gives_zero_loss_and_gradient():
    _, t, labels, targets, pairs, vmap = _cross_case()
    hidden = torch.randn(*labels.shape, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(32, 8, dtype=torch.float64)
    out = fused_cross_tokenizer_loss(
        hidden, weight, None, t, torch.full_like(labels, -100), targets, pairs, vmap, top_k=4, vocab_size=30,
        backend="torch",
    )  # fmt: skip
    (grad,) = torch.autograd.grad(out.loss, hidden)
    assert out.loss == 0 and out.num_tokens == 0 and grad.abs().max() == 0 and not torch.isnan(grad).any()
