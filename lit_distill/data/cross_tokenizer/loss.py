"""The cross-tokenizer loss: boundary KD on the binned teacher, chunk likelihoods between boundaries, and ULD.

Every position is a prediction position ``p`` (its logits predict token ``p + 1``), as the modules shift. On a
student row of ``S`` predictions and a teacher row of ``U`` (one text, two tokenizations), the batch gives:

- boundary pairs ``(ps, pt)`` where both models have read the same bytes (``collate.py``): the teacher's
  distribution at ``pt``, binned into the student's vocabulary through the :class:`~.vocab_map.VocabularyMap`, is
  the target of the student's at ``ps``;
- chunk ids per position: the text between two boundaries, whose likelihood each model gives as the sum of its
  tokens' log-probabilities.

With student logits ``s``, teacher logits ``t``, temperature ``T`` and counted student positions ``N``:

- **boundary** (per pair): ``D(p ‖ softmax(s/T))`` for any divergence of DESIGN.md, times T² with ``t2_scaling``,
  where ``p ∝ b^(1/T)`` and ``b = bin(softmax(t))`` is the teacher's distribution binned into the student's
  vocabulary at T=1 (with the label's mass moved onto it where binning misses it, ``longer_labels.py``): tempered
  in the student's space, so that a bin of many small teacher tokens is not inflated by flattening them one by
  one. ``top_k=None`` calls the dense loss with the binned logits ``log Σ_bin exp(t)`` (a map that bins no two
  teacher tokens together copies the logits, so the same tokenizer on both sides is soft-label distillation
  exactly, at any T); ``top_k=K`` keeps the K likeliest tokens of ``p`` and a tail bucket for the rest (the sparse
  loss, ``tail=True``).
- **chunk** (per chunk, ALM-style, at T=1): with ``a = exp(ℓ_teacher)``, ``b = exp(ℓ_student)`` the chunk's
  likelihoods, the binary KL ``a log(a/b) + (1−a) log((1−a)/(1−b))`` (``ℓ`` clamped to ``≤ -1e-6``).
- **uld** (per pair): ``Σ_{i<k} |sort(softmax(s/T))_i − sort(softmax(t/T))_i|`` over the k largest probabilities
  of each side in its own vocabulary (ULD's sorted comparison, top-k truncated), times T² with ``t2_scaling``.
- **hard** (per counted student position, T=1): the student's cross-entropy on its labels.

``loss = alpha·(w_b·Σ boundary + w_c·Σ chunk + w_u·Σ uld) + (1 − alpha)·Σ_pairs hard + Σ_unpaired hard``, summed
(``reduction="sum"``, what the modules normalize by ``N`` per optimizer step) or divided by ``N`` (``"mean"``). A
counted position that is no pair (inside a chunk) has no teacher distribution: its label stands in for it, at full
weight (at ``1 − alpha`` those positions ended 0.45 nats worse than a student trained alone: docs/cross-tokenizer.md),
unless ``unpaired_labels=False`` (on-policy samples, which are no labels to learn).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ...kernels import distillation_loss
from ...kernels.sparse import sparse_distillation_loss
from .binning import binned_logits, binned_probs, covered, tempered_top_k, wide
from .longer_labels import label_moves, moved
from .vocab_map import VocabularyMap

_MAX_LOG_LIKELIHOOD = -1e-6  # a chunk of probability 1 has no binary complement: keep log(1 - b) finite
#: the loss keywords the cross-tokenizer loss reads from a DistillationLoss
KEYWORDS = ("divergence", "beta", "skew", "temperature", "t2_scaling", "alpha", "vocab_size", "ignore_index", "backend")


class CrossTokenizerOutput(NamedTuple):
    """The loss (with the gradient) and detached statistics of one call.

    Attributes:
        loss: the combined loss (a sum over counted positions, or its mean).
        soft: the boundary term's mean over counted boundary pairs (T² included).
        hard: the student's cross-entropy, mean over counted positions.
        teacher_ce: the teacher's cross-entropy on the tokens of the counted chunks.
        agreement: the share of boundary pairs where the student's argmax is the binned teacher's.
        num_tokens: counted student positions (the normalizer's N).
        chunk: the chunk term's mean over counted chunks.
        uld: the ULD term's mean over counted boundary pairs.
        boundaries: how many boundary pairs were counted.
    """

    loss: torch.Tensor
    soft: torch.Tensor
    hard: torch.Tensor
    teacher_ce: torch.Tensor
    agreement: torch.Tensor
    num_tokens: torch.Tensor
    chunk: torch.Tensor
    uld: torch.Tensor
    boundaries: torch.Tensor

    @property
    def boundary_share(self) -> torch.Tensor:
        """The share of counted student positions that are boundary pairs."""
        return self.boundaries / self.num_tokens.clamp(min=1)


class Pairs(NamedTuple):
    """Boundary pairs and chunks of a batch in prediction positions: the student's columns without the last (the
    module's shift), the teacher's all of them (a pair may sit on a teacher row's last token: the teacher's logits
    there predict the text that follows, which the student row still holds)."""

    student: torch.Tensor  # [B, K] student prediction positions, -1 padding
    teacher: torch.Tensor  # [B, K] teacher prediction positions, -1 padding
    student_chunk: torch.Tensor  # [B, S] chunk id of each student position's target, -1 none
    teacher_chunk: torch.Tensor  # [B, U] the same for the teacher

    @classmethod
    def of(cls, batch) -> Pairs:
        """The pairs of a collated cross-tokenizer batch (``collate.py``'s keys)."""
        return cls(
            batch["boundary_student"], batch["boundary_teacher"],
            batch["student_chunk"][:, :-1], batch["teacher_chunk"],
        )  # fmt: skip


def cross_tokenizer_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_targets: torch.Tensor,
    pairs: Pairs,
    vocab_map: VocabularyMap,
    *,
    top_k: int | None = 64,
    boundary_weight: float = 1.0,
    chunk_weight: float = 0.0,
    uld_weight: float = 0.0,
    uld_top_k: int = 64,
    teacher_ce: bool = True,
    unpaired_labels: bool = True,
    byte_lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    temperature: float = 1.0,
    t2_scaling: bool = True,
    alpha: float = 1.0,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    backend: str = "auto",
) -> CrossTokenizerOutput:
    """The cross-tokenizer loss of one batch (see the module docstring for the math).

    Args:
        student_logits: ``[B, S, Vs]`` (``Vs`` may be a padded head; ``vocab_size`` is then the real size).
        teacher_logits: ``[B, U, Vt]`` with ``Vt`` the map's ``teacher_vocab_size``; no gradient flows to it.
        labels: ``[B, S]`` the student's targets, ``ignore_index`` where not counted.
        teacher_targets: ``[B, U]`` the teacher's next tokens (read only where ``pairs.teacher_chunk >= 0``; the
            module passes every teacher position, ``U = Tt``, the last target a pad).
        pairs: the boundary pairs and chunks (:meth:`Pairs.of` a batch).
        vocab_map: teacher -> student ids.
        top_k: binned slots of the boundary term (with a tail bucket), or None for the whole binned distribution.
        boundary_weight, chunk_weight, uld_weight: the terms' weights inside ``alpha``.
        uld_top_k: probabilities compared by ULD per side.
        teacher_ce: compute the chunks (and the teacher's cross-entropy on them) even when ``chunk_weight`` is 0:
            for statistics (the teacher's log-probabilities at every position cost about a soft-label loss).
        unpaired_labels: counted positions that are no pair train on their labels at full weight (else 1 - alpha).
        divergence, beta, skew, temperature, t2_scaling, alpha, vocab_size, ignore_index, backend: as in
            :func:`lit_distill.kernels.distillation_loss` (the sparse loss takes neither skew divergences nor
            ``skew``).
        byte_lengths: ``(student [Vs], teacher [Vt])`` bytes of each token id; with them, where binning misses the
            student's label, the teacher's probability of its bytes moves onto it (``longer_labels.py``).
        reduction: ``"sum"`` over counted positions or their ``"mean"``.

    Raises:
        ValueError: a teacher width other than the map's, a bad ``top_k``/weight/reduction, and the loss's own.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction={reduction!r}: the cross-tokenizer loss sums or averages ('sum', 'mean')")
    for name, value in (
        ("boundary_weight", boundary_weight),
        ("chunk_weight", chunk_weight),
        ("uld_weight", uld_weight),
    ):
        if not value >= 0:
            raise ValueError(f"{name}={value} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be a positive number of slots, or None for the whole distribution")
    vocab = vocab_size or student_logits.shape[-1]
    if teacher_logits.shape[-1] != vocab_map.teacher_vocab_size:
        raise ValueError(
            f"the teacher's last dimension has {teacher_logits.shape[-1]} entries, the vocabulary map"
            f" {vocab_map.teacher_vocab_size} (teacher_vocab_size): build the map with the teacher head's width"
        )
    if vocab_map.student_vocab_size > student_logits.shape[-1]:
        raise ValueError(
            f"the vocabulary map's student has {vocab_map.student_vocab_size} tokens, the student's logits"
            f" {student_logits.shape[-1]}: the map was built for another student tokenizer"
        )
    if top_k is None and divergence == "reverse_kl" and covered(vocab_map, vocab) < vocab:
        raise ValueError(
            "divergence='reverse_kl' with top_k=None is infinite wherever the student puts mass on a token that no"
            " teacher token bins into (the binned teacher gives it probability 0), and this vocabulary map leaves"
            f" {vocab - covered(vocab_map, vocab)} of the student's {vocab} tokens empty: use top_k (a tail bucket"
            " holds the rest of the mass), or jsd / skew_reverse_kl"
        )
    real = vocab_map.teacher_tokens  # columns past it are the teacher head's padding
    counted = labels != ignore_index
    num_tokens = counted.sum()

    # the student's cross-entropy at every counted position: the hard term and the chunks' likelihoods
    ce = F.cross_entropy(
        wide(student_logits[..., :vocab].flatten(0, -2)), labels.flatten(), ignore_index=ignore_index,
        reduction="none",
    ).view_as(labels)  # fmt: skip
    hard_sum = ce.sum()

    # boundary pairs, gathered without a host sync: invalid ones get ignore_index and count for nothing
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None]
    ps, pt = pairs.student.clamp(min=0), pairs.teacher.clamp(min=0)
    pair_labels = torch.where(pairs.student >= 0, labels[rows, ps], ignore_index)
    used = pair_labels != ignore_index
    # counted positions without a pair keep their label's whole weight (scatter-add: padding adds 0 at index 0)
    paired = torch.zeros_like(labels, dtype=torch.int32).scatter_add_(1, ps, used.to(torch.int32)) > 0
    unpaired_sum = torch.where(paired, 0.0, ce).sum() if unpaired_labels else ce.new_zeros(())
    s_pairs, t_pairs = student_logits[rows, ps], teacher_logits[rows, pt].detach()
    t_pairs = without_padding(wide(t_pairs), real)
    soft_keywords = dict(
        divergence=divergence, beta=beta, temperature=temperature, t2_scaling=t2_scaling, alpha=1.0,
        vocab_size=vocab_size, ignore_index=ignore_index, reduction="sum", backend=backend,
    )  # fmt: skip
    # the teacher binned at T=1 (its distribution over the student's next token), then tempered in that space
    width = s_pairs.shape[-1]
    moves = None
    if byte_lengths is not None:
        teacher = without_padding(teacher_logits.detach(), real)
        moves = label_moves(pairs, labels, teacher, teacher_targets, vocab_map, 1.0, width, byte_lengths)
    if top_k is None:
        if moves is None:  # a map that bins no two tokens together copies the logits (one tokenizer: exact)
            mapped = binned_logits(t_pairs, vocab_map, width)
        else:  # the binned probabilities, moved, as logits (no softmax of logits that were just a log)
            mapped = moved(binned_probs(torch.softmax(t_pairs, -1), vocab_map, width), moves).log()
        boundary = distillation_loss(s_pairs, mapped.to(s_pairs.dtype), pair_labels, skew=skew, **soft_keywords)
    else:
        binned = binned_probs(torch.softmax(t_pairs, -1), vocab_map, width)
        binned = binned if moves is None else moved(binned, moves)
        ids, logprobs = tempered_top_k(binned, temperature, min(top_k, vocab))
        boundary = sparse_distillation_loss(s_pairs, ids, logprobs, pair_labels, tail=True, **soft_keywords)
    boundaries = used.sum()

    if chunk_weight > 0 or teacher_ce:
        chunk_sum, chunks, teacher_mean = _chunk_term(ce, teacher_logits, teacher_targets, pairs, counted, real)
    else:  # the teacher's log-probabilities at every position are the chunk term's largest cost: skip them
        chunk_sum, chunks, teacher_mean = ce.new_zeros(()), counted.new_zeros(()), ce.new_full((), math.nan)
    uld_sum = _uld(s_pairs, t_pairs, used, vocab, uld_top_k, temperature) if uld_weight > 0 else ce.new_zeros(())
    if t2_scaling:
        uld_sum = uld_sum * temperature**2

    soft_sum = boundary_weight * boundary.loss + chunk_weight * chunk_sum + uld_weight * uld_sum
    loss = alpha * (soft_sum + unpaired_sum) + (1 - alpha) * hard_sum if alpha < 1 else soft_sum + unpaired_sum
    if reduction == "mean":
        loss = loss / num_tokens.clamp(min=1)
    return CrossTokenizerOutput(
        loss=loss, soft=boundary.soft, hard=(hard_sum / num_tokens.clamp(min=1)).detach(), teacher_ce=teacher_mean,
        agreement=boundary.agreement, num_tokens=num_tokens, chunk=(chunk_sum / chunks.clamp(min=1)).detach(),
        uld=(uld_sum / boundaries.clamp(min=1)).detach(), boundaries=boundaries,
    )  # fmt: skip


def without_padding(teacher: torch.Tensor, real: int) -> torch.Tensor:
    """``teacher`` with the head's padded columns (from ``real`` on) at -inf: out of its softmax (DESIGN.md)."""
    if teacher.shape[-1] == real:
        return teacher
    return teacher.masked_fill(torch.arange(teacher.shape[-1], device=teacher.device) >= real, -math.inf)


def _chunk_term(ce, teacher_logits, teacher_targets, pairs: Pairs, counted, real: int):
    """(Σ binary KL over chunks counted on both sides, their number, the teacher's CE on their tokens)."""
    b, s = ce.shape
    u = teacher_targets.shape[1]
    width = max(s, u)  # a row has fewer chunks than positions on either side
    s_chunk, t_chunk = pairs.student_chunk, pairs.teacher_chunk
    s_in, t_in = (s_chunk >= 0) & counted, t_chunk >= 0
    with torch.no_grad():
        t_logits = without_padding(wide(teacher_logits), real)
        t_ce = F.cross_entropy(t_logits.flatten(0, -2), teacher_targets.clamp(min=0).flatten(), reduction="none").view(
            b, u
        )
        t_ce = torch.where(t_in, t_ce, 0.0)
    offsets = torch.arange(b, device=ce.device)[:, None] * width
    s_index = torch.where(s_in, s_chunk, 0) + offsets
    t_index = torch.where(t_in, t_chunk, 0) + offsets
    student_ll = ce.new_zeros(b * width).index_add(0, s_index.flatten(), -torch.where(s_in, ce, 0.0).flatten())
    teacher_ll = ce.new_zeros(b * width).index_add(0, t_index.flatten(), -t_ce.flatten())
    on_both = (ce.new_zeros(b * width).index_add(0, s_index.flatten(), s_in.flatten().to(ce.dtype)) > 0) & (
        ce.new_zeros(b * width).index_add(0, t_index.flatten(), t_in.flatten().to(ce.dtype)) > 0
    )
    per_chunk = _binary_kl(teacher_ll.clamp(max=_MAX_LOG_LIKELIHOOD), student_ll.clamp(max=_MAX_LOG_LIKELIHOOD))
    t_tokens = t_in.sum()
    teacher_ce = torch.where(t_tokens > 0, t_ce.sum() / t_tokens.clamp(min=1), math.nan).detach()
    return torch.where(on_both, per_chunk, 0.0).sum(), on_both.sum(), teacher_ce


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Mächler's switch at -ln 2)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _binary_kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(a) ‖ Bernoulli(b)) from log-probabilities; the gradient flows through ``log_b``."""
    a = log_a.exp()
    return a * (log_a - log_b) + (1 - a) * (_log1mexp(log_a) - _log1mexp(log_b))


def _uld(s_pairs, t_pairs, used, vocab: int, k: int, temperature: float) -> torch.Tensor:
    """Σ over used pairs of the L1 distance between the k largest probabilities of each side (ULD)."""
    q = torch.softmax(wide(s_pairs[..., :vocab]) / temperature, -1)
    p = torch.softmax(t_pairs / temperature, -1)
    width = min(k, q.shape[-1], p.shape[-1])
    distance = (q.topk(width, -1).values - p.topk(width, -1).values).abs().sum(-1)
    return torch.where(used, distance, 0.0).sum()
