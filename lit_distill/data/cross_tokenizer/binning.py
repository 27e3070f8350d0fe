"""Binning the teacher's distribution into the student's vocabulary through a :class:`~.vocab_map.VocabularyMap`,
on tensors, for the loss: as logits whose softmax is the binned distribution (the dense boundary term), or as the
top-k bins (the sparse one). Dropped teacher ids (a padded head) go to one extra "sink" column, cut off after the
scatter, so no gather of the kept ids is needed (a gather along the vocabulary cost as much as the rest of the
binning on the CPU).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .vocab_map import VocabularyMap


def wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 at least (float64 stays float64: the references are computed in it)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def binned_logits(teacher_logits: torch.Tensor, vocab_map: VocabularyMap, width: int):
    """``[..., Vt]`` teacher logits -> ``[..., width]`` logits ``m`` with ``softmax(m)`` the teacher's distribution
    binned into the student's vocabulary (``-inf`` where no teacher token lands).

    ``m = log Σ_bin softmax(t)``; a map that sends no two teacher tokens to one student token copies the logits
    instead (exact, no rounding: with one tokenizer on both sides the loss is soft-label distillation's).
    """
    source = wide(teacher_logits)
    if _bin_sizes(vocab_map).max(initial=0) <= 1:  # injective: the dropped ids all land in the sink, cut off
        index = sink_targets(vocab_map, source.device, width).expand(source.shape)
        out = source.new_full((*source.shape[:-1], width + 1), -math.inf)
        return out.scatter(-1, index, source)[..., :width]
    # one softmax and one scatter (a log-sum-exp per bin cost two scatters, a gather and an exp more)
    return binned_probs(torch.softmax(source, -1), vocab_map, width).log()


def binned_probs(teacher_probs: torch.Tensor, vocab_map: VocabularyMap, width: int) -> torch.Tensor:
    """``[..., Vt]`` probabilities summed into ``[..., width]`` student bins (dropped ids' mass is lost):
    :meth:`VocabularyMap.bin_probs` by one scatter into a sink column, without gathering the kept ids."""
    index = sink_targets(vocab_map, teacher_probs.device, width).expand(teacher_probs.shape)
    binned = teacher_probs.new_zeros((*teacher_probs.shape[:-1], width + 1)).scatter_add_(-1, index, teacher_probs)
    return binned[..., :width]


def top_k_slots(binned: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, logprobs)`` ``[..., k]`` of the ``k`` likeliest bins, -1 and -inf for empty slots."""
    values, ids = binned.topk(k, dim=-1)
    empty = values <= 0
    return ids.masked_fill(empty, -1), values.log().masked_fill(empty, -math.inf)


def tempered_top_k(binned: torch.Tensor, temperature: float, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_k_slots` of binned probabilities tempered in the student's space (``p ∝ b^(1/T)``)."""
    return top_k_slots(torch.softmax(binned.log() / temperature, -1), k)


def sink_targets(vocab_map: VocabularyMap, device: torch.device, width: int) -> torch.Tensor:
    """``int64 [Vt]``: each teacher id's student id, dropped ids sent to column ``width`` (sliced off after binning);
    on ``device`` once per map and width."""
    key = ("sink", device, width)
    if key not in vocab_map._tensors:
        mapping = vocab_map.teacher_to_student
        vocab_map._tensors[key] = torch.from_numpy(np.where(mapping >= 0, mapping, width)).to(device)
    return vocab_map._tensors[key]


def _bin_sizes(vocab_map: VocabularyMap) -> np.ndarray:
    """How many teacher ids land in each student id (computed once per map)."""
    if "bin_sizes" not in vocab_map._tensors:
        mapping = vocab_map.teacher_to_student
        vocab_map._tensors["bin_sizes"] = np.bincount(mapping[mapping >= 0], minlength=vocab_map.student_vocab_size)
    return vocab_map._tensors["bin_sizes"]


def covered(vocab_map: VocabularyMap, vocab: int) -> int:  # student tokens that some teacher token bins into
    return int((_bin_sizes(vocab_map)[:vocab] > 0).sum())
