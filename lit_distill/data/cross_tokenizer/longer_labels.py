"""The binned teacher's mass for the student's label, where binning misses it.

Binning sends each teacher token to the first piece of the student's tokenization of its text alone. Where the
student's next token (its label) is longer than the teacher's next token (the label ``"thee"``, the teacher reading
``"the"`` then ``"e"``), or ends inside it while the student's tokenizer cuts that token's text another way, no
teacher token bins into the label: the binned teacher gives the student's own next token probability about 0, and
the boundary term pushes against the cross-entropy. (On the demo's tokenizers, 12.9% of the pairs; the
binned teacher's cross-entropy on the labels there was 18 to 30 nats.)

Along its own tokenization, the teacher's probability that the text goes on with the label's bytes is at least the
probability of its next tokens up to the first one that ends at or past the label's end:
``a = exp(Σ log softmax(t/T)[next])`` over those positions (their strings all start with the label's bytes). That
mass lies inside the probability of the teacher's first next token, binned into ``bin(first)``, so at each pair
``min(a, p[bin(first)])`` moves from ``bin(first)`` to the label. The total stays 1 and nothing goes negative; where
``bin(first)`` is the label already (one tokenizer on both sides, equal tokens) nothing moves.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .binning import sink_targets, wide
from .vocab_map import VocabularyMap


class Moves(NamedTuple):
    """Per pair ``[B, K]``: the mass to move (0 where none), from which student id, to which (the label)."""

    mass: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor

    @property
    def rows(self) -> torch.Tensor:
        return self.mass > 0


def label_moves(
    pairs,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_targets: torch.Tensor,
    vocab_map: VocabularyMap,
    temperature: float,
    width: int,
    byte_lengths: tuple[torch.Tensor, torch.Tensor],
) -> Moves | None:
    """The moves of a batch's pairs (see the module docstring), or None when no pair needs one.

    Args:
        pairs: the batch's :class:`~.loss.Pairs`.
        labels: ``[B, S]`` the student's targets.
        teacher_logits: ``[B, U, Vt]`` (padded columns already at -inf, or none).
        teacher_targets: ``[B, U]`` the teacher's next tokens (padding: zero-width tokens).
        vocab_map: teacher -> student ids.
        temperature: T of the binned distribution.
        width: the student's logit width (the sink column's index).
        byte_lengths: ``(student [Vs], teacher [Vt])`` int64 bytes of each token id.
    """
    b, u = teacher_targets.shape
    rows = torch.arange(b, device=labels.device)[:, None]
    ps, pt = pairs.student.clamp(min=0), pairs.teacher.clamp(min=0)
    label = labels[rows, ps]
    valid = (pairs.student >= 0) & (label >= 0)
    # the first teacher prediction position j >= pt whose target ends at or past the label's last byte
    ends = byte_lengths[1][teacher_targets.clamp(min=0)].cumsum(1)
    before = torch.where(pt > 0, ends.gather(1, (pt - 1).clamp(min=0)), 0)
    wanted = before + byte_lengths[0][label.clamp(min=0)]
    last = torch.searchsorted(ends, wanted.contiguous()).clamp(min=pt)
    source = sink_targets(vocab_map, labels.device, width)[teacher_targets.gather(1, pt)]
    move = valid & (last < u) & (source != label) & (source < width)
    if not bool(move.any()):
        return None
    last = last.clamp(max=u - 1)
    # the teacher's tempered log-probabilities of its next tokens, only at the positions some move reads
    step = torch.zeros(b, u + 1, dtype=torch.long, device=labels.device)
    step.scatter_add_(1, pt, move.long()).scatter_add_(1, last + 1, -move.long())
    where = torch.nonzero(step.cumsum(1)[:, :u] > 0, as_tuple=True)
    logprobs = torch.log_softmax(wide(teacher_logits[where]) / temperature, -1)
    token = torch.zeros(b, u, dtype=logprobs.dtype, device=labels.device)
    token[where] = logprobs.gather(1, teacher_targets[where][:, None]).squeeze(1)
    total = token.cumsum(1)
    likelihood = total.gather(1, last) - torch.where(pt > 0, total.gather(1, (pt - 1).clamp(min=0)), 0.0)
    mass = torch.where(move, likelihood.exp(), 0.0)
    return Moves(mass, torch.where(move, source, 0), torch.where(move, label, 0))


def moved(probs: torch.Tensor, moves: Moves) -> torch.Tensor:
    """``[B, K, V]`` binned probabilities with the moves applied (each capped by what its source holds)."""
    source, target = moves.source[..., None], moves.target[..., None]
    mass = torch.minimum(moves.mass[..., None].to(probs.dtype), probs.gather(-1, source))
    return probs.scatter_add(-1, source, -mass).scatter_add(-1, target, mass).clamp(min=0)
