"""How the demo measures a model on the held-out works: cross-entropy per token, bits per byte, and its argmax.

Bits per byte is what compares students of different tokenizers: the summed negative log-likelihood (nats) of the
held-out target tokens over ``ln 2`` times the UTF-8 bytes those tokens stand for (the data's tokenizer's own byte
map; special tokens such as the EOS between works are zero bytes and their nats count, as the modules'
``val/bits_per_byte``). Per-token cross-entropy falls with a smaller vocabulary's shorter tokens; this does not.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class HeldOut(NamedTuple):
    """``ce``: token-mean cross-entropy (nats); ``bits_per_byte`` (``nan`` when the tokenizer's bytes cannot be
    read); ``argmax``: the model's top token at every position, ``[B, T-1]``."""

    ce: float
    bits_per_byte: float
    argmax: torch.Tensor


@torch.no_grad()
def held_out(model, data, batch_size: int | None = None) -> HeldOut:
    """``model`` on the whole validation split of ``data`` (its ``val_blocks``, in order, without a DataLoader,
    whose iterator draws from the RNG)."""
    import torch.nn.functional as F

    lengths = byte_lengths_of(getattr(data, "tokenizer", None))
    nats, tokens, nbytes, argmax = 0.0, 0, 0, []
    device = next(model.parameters()).device
    data.setup()
    for batch in data.val_blocks.split(batch_size or data.batch_size):
        ids = batch.to(device).long()
        logits = model(input_ids=ids).logits[:, :-1].float()
        targets = ids[:, 1:]
        nats += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        tokens += targets.numel()
        if lengths is not None:
            nbytes += int(lengths[targets.cpu()].sum())
        argmax.append(logits.argmax(-1).cpu())
    bits = nats / (math.log(2) * nbytes) if nbytes else math.nan
    return HeldOut(nats / tokens, bits, torch.cat(argmax))


def byte_lengths_of(tokenizer) -> torch.Tensor | None:
    """``int64 [len(tokenizer)]``: the UTF-8 bytes of each token, or None when they cannot be read."""
    from ..data.cross_tokenizer import byte_lengths

    if tokenizer is None:
        return None
    try:
        return torch.tensor(byte_lengths(tokenizer))  # a copy: the cached array is read-only
    except ValueError:  # a tokenizer whose bytes cannot be read (WordPiece): no bits per byte
        return None


def _evaluate(model, data, batch_size: int | None = None) -> tuple[float, torch.Tensor]:
    """Token-mean CE of ``model`` on the whole validation split, and its argmax at every position (``[B, T-1]``,
    for :func:`_agreement` with the teacher's, which is computed once)."""
    ce, _, argmax = held_out(model, data, batch_size)
    return ce, argmax


def _agreement(argmax: torch.Tensor, teacher_argmax: torch.Tensor) -> float:
    """The fraction of validation positions where the two models' top tokens are the same."""
    return (argmax == teacher_argmax).float().mean().item()
