"""What a model's forward gets for packed rows: ``position_ids`` and a 4-D block-diagonal causal mask.

A packed row holds several documents; its ``position_ids`` restart at 0 at each. On CPU, transformers' sdpa and
eager attention read ``position_ids`` only for the rotary embeddings: given a 2-D mask they still let a document
attend to the ones before it in the row (measured in ``research/data-anchors-2026-12.md``: a max logit difference
of 0.25 against the document run alone). A 4-D float mask, 0 where a query may attend and the dtype's minimum
elsewhere, isolates them in both; transformers hands a 4-D mask to the attention as it is.
"""

from __future__ import annotations

import torch
from torch import nn


def packed_causal_mask(
    position_ids: torch.Tensor, attention_mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """The additive ``(B, 1, T, T)`` mask of packed rows: query i attends to key j when j <= i, both lie in the
    same document and j is a token (``attention_mask`` 1); every other entry is ``torch.finfo(dtype).min``.

    A document starts where ``position_ids`` do not continue the previous position by one (so padding that
    continues the count joins the last document, and padding at 0 starts its own; either way the padding keys are
    masked). Every query attends at least to itself, so no softmax row is all masked (no NaN at padding).

    Args:
        position_ids: ``(B, T)`` positions restarting at 0 at each document.
        attention_mask: ``(B, T)`` 1 on tokens, 0 on padding; None: all tokens.
        dtype: the model's floating dtype (sdpa refuses a float mask of another dtype than its queries).

    Returns:
        ``(B, 1, T, T)`` tensor of ``dtype`` on ``position_ids``' device.
    """
    batch, length = position_ids.shape
    start = torch.ones_like(position_ids, dtype=torch.bool)
    start[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    document = start.cumsum(1)
    allowed = document[:, :, None] == document[:, None, :]
    allowed &= torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    if attention_mask is not None:
        allowed &= attention_mask[:, None, :].bool()
    allowed |= torch.eye(length, dtype=torch.bool, device=position_ids.device)
    mask = torch.zeros(batch, 1, length, length, dtype=dtype, device=position_ids.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def attention_inputs(
    model: nn.Module, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    """The keyword arguments for ``model(input_ids=..., **these)``: the 2-D ``attention_mask`` as it is when
    there are no ``position_ids``; with them, the ``position_ids`` and :func:`packed_causal_mask` in the
    model's dtype."""
    if position_ids is None:
        return {"attention_mask": attention_mask}
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {"attention_mask": packed_causal_mask(position_ids, attention_mask, dtype), "position_ids": position_ids}
