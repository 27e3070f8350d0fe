"""The cross-tokenizer loss from the student's hidden states and head, its logits never whole (``fused_linear``).

With no chunk or ULD term and a boundary weight of 1, :func:`~.loss.cross_tokenizer_loss` is two sparse distillation
losses in the student's vocabulary, which the fused-linear sparse kernel computes ``chunk_size`` tokens at a time,
as :class:`~lit_distill.modules.OfflineDistillation` does on a teacher cache: the pairs' hidden states against the
binned teacher's ``top_k`` likeliest student tokens (moved and tempered as there) with a tail bucket, at ``alpha``;
every other counted token against empty slots at alpha 0 (its label at full weight). The loss and its gradient
equal the unfused path's; the student's ``[B, S, V]`` logits never exist.
"""

from __future__ import annotations

import math

import torch

from ...kernels.sparse import fused_linear_sparse_distillation_loss
from .binning import binned_probs, tempered_top_k, wide
from .longer_labels import label_moves, moved
from .loss import CrossTokenizerOutput, Pairs, without_padding
from .vocab_map import VocabularyMap

#: the sparse loss's keywords of a DistillationLoss (no skew: the sparse loss has no skew divergences)
SPARSE_KEYWORDS = ("divergence", "beta", "temperature", "t2_scaling", "alpha", "vocab_size", "ignore_index", "backend")


def fusable(options: dict) -> bool:
    """Whether the cross-tokenizer options (the module's ``cross_options``) are a sparse loss this path computes."""
    return (
        options.get("top_k") is not None
        and options.get("chunk_weight", 0.0) == 0
        and options.get("uld_weight", 0.0) == 0
        and options.get("boundary_weight", 1.0) == 1
    )


def fused_cross_tokenizer_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_targets: torch.Tensor,
    pairs: Pairs,
    vocab_map: VocabularyMap,
    *,
    top_k: int,
    byte_lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
    unpaired_labels: bool = True,
    chunk_size: int | None = None,
    **keywords,
) -> CrossTokenizerOutput:
    """:func:`~.loss.cross_tokenizer_loss` with ``top_k`` slots and only the boundary term, from ``student_hidden``
    ``[B, S, H]`` (the prediction positions) and the head ``student_weight`` ``[V, H]`` / ``student_bias``; the other
    arguments as there, ``keywords`` those of :data:`SPARSE_KEYWORDS` (``reduction="sum"``). ``teacher_ce``, ``chunk``
    and ``uld`` of the output are NaN, 0 and 0."""
    ignore, alpha = keywords.get("ignore_index", -100), keywords.get("alpha", 1.0)
    width = student_weight.shape[0]
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None]
    ps, pt = pairs.student.clamp(min=0), pairs.teacher.clamp(min=0)
    used = (pairs.student >= 0) & (labels[rows, ps] != ignore)
    teacher = without_padding(teacher_logits.detach(), vocab_map.teacher_tokens)
    with torch.no_grad():
        moves = None
        if byte_lengths is not None:
            moves = label_moves(pairs, labels, teacher, teacher_targets, vocab_map, 1.0, width, byte_lengths)
        # the binned teacher is [pairs, V]: made, moved, tempered and cut to top_k a block of pairs at a time
        pair_row, pair_at = used.nonzero(as_tuple=True)
        k, temperature = min(top_k, keywords.get("vocab_size") or width), keywords.get("temperature", 1.0)
        dtype = torch.promote_types(teacher.dtype, torch.float32)  # as wide() gives it
        ids, logprobs = labels.new_zeros((0, k)), torch.zeros((0, k), dtype=dtype, device=labels.device)
        step = chunk_size or 1024
        for i in range(0, len(pair_row), step):
            row, at = pair_row[i : i + step], pair_at[i : i + step]
            binned = binned_probs(torch.softmax(wide(teacher[row, pt[row, at]]), -1), vocab_map, width)
            if moves is not None:
                binned = moved(binned, type(moves)(*(field[row, at] for field in moves)))
            block_ids, block_logprobs = tempered_top_k(binned, temperature, k)
            ids, logprobs = torch.cat([ids, block_ids]), torch.cat([logprobs, block_logprobs])
    options = {name: keywords[name] for name in SPARSE_KEYWORDS if name in keywords}
    options.update(student_bias=student_bias, chunk_size=chunk_size, tail=True, reduction="sum")
    # the pairs: KD on their binned slots and (1 - alpha) CE; every other counted token: its label at full weight
    # (alpha 0 on empty slots) or, with unpaired_labels=False, at 1 - alpha as the pairs
    paired = torch.zeros_like(labels, dtype=torch.int32).scatter_add_(1, ps, used.to(torch.int32)) > 0
    rest = ~paired & (labels != ignore)
    empty = labels.new_full((int(rest.sum()), 1), -1)
    parts = [
        (student_hidden[rows, ps][used], ids, logprobs, labels[rows, ps][used], alpha),
        (student_hidden[rest], empty, torch.full(empty.shape, -math.inf, device=empty.device), labels[rest],
         0.0 if unpaired_labels else alpha),
    ]  # fmt: skip
    outs = [
        fused_linear_sparse_distillation_loss(hidden, student_weight, i, lp, target, **{**options, "alpha": a})
        if len(target)
        else None
        for hidden, i, lp, target, a in parts
    ]
    done = [out for out in outs if out is not None]
    zero = student_hidden.new_zeros((), dtype=torch.float32)
    num_tokens = sum((out.num_tokens for out in done), labels.new_zeros(()))
    hard = sum((out.hard * out.num_tokens for out in done), zero) / num_tokens.clamp(min=1)
    loss = sum((out.loss for out in done), student_hidden.sum() * 0.0)  # 0, on the graph, when nothing counts
    pairs_out = outs[0]
    return CrossTokenizerOutput(
        loss=loss, soft=zero + math.nan if pairs_out is None else pairs_out.soft, hard=hard, teacher_ce=zero + math.nan,
        agreement=zero + math.nan if pairs_out is None else pairs_out.agreement, num_tokens=num_tokens, chunk=zero,
        uld=zero, boundaries=used.sum(),
    )  # fmt: skip
