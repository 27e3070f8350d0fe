"""Continuing prompts with a model's ``generate``: seeded, in eval mode, as one right-padded training batch.

Prompts come as prefixes of right-padded rows (packed text, chat batches with a ``prompt_mask``) or as
left-padded prompt-only batches (``PromptDataModule``: ``prompt_mask`` equal to ``attention_mask``,
:func:`is_prompt_only`), which :func:`packed_left` turns into the first form.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn


class Continuations(NamedTuple):
    """Prompts and the tokens generated after them, packed to the left of each row.

    Attributes:
        input_ids: ``(B, P + G)`` each row's prompt, then its generated tokens, then padding.
        attention_mask: ``(B, P + G)`` 1 on the prompt and the kept generated tokens, 0 on padding.
        labels: ``(B, P + G)`` the kept generated tokens, ``ignore_index`` elsewhere (the Hugging Face
            convention: aligned with ``input_ids``; position t is predicted from the tokens before it).
        generated_tokens: ``(B,)`` kept generated tokens per row (up to and including the first stop token, as
            TRL's GKD keeps its EOS; what follows it is dropped).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    generated_tokens: torch.Tensor


def can_generate(model: nn.Module) -> bool:
    """Whether ``model`` has a Hugging Face ``generate`` that works (its ``can_generate()`` when it has one)."""
    check = getattr(model, "can_generate", None)
    return callable(getattr(model, "generate", None)) and (check is None or bool(check()))


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (a run's seed, a step, a rank): distinct tuples give unrelated seeds."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def prompt_lengths_of(input_ids: torch.Tensor, prompt_length: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``(B,)`` prompt tokens per row: ``prompt_length``, or a right-padded row's real tokens when it has fewer
    (at least 1: ``generate`` needs a token to continue)."""
    lengths = torch.full((input_ids.shape[0],), prompt_length, device=input_ids.device)
    if attention_mask is not None:
        lengths = lengths.clamp(max=attention_mask.sum(1)).clamp(min=1)
    return lengths


def is_prompt_only(batch: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``batch`` holds prompts alone: its ``prompt_mask`` marks every token its ``attention_mask`` does
    (``PromptDataModule``'s left-padded batches); there is no completion to learn from off-policy."""
    prompt_mask, attention_mask = batch.get("prompt_mask"), batch.get("attention_mask")
    if prompt_mask is None or attention_mask is None:
        return False
    return bool(torch.equal(prompt_mask.bool(), attention_mask.bool()))


def packed_left(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with each row's real tokens moved to its start, in order (a left-padded
    batch becomes right-padded): each row at its natural positions, and its prompt a prefix."""
    order = torch.sort((attention_mask == 0).int(), dim=1, stable=True).indices
    return input_ids.gather(1, order), attention_mask.gather(1, order)


def prompts_as_prefixes(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A prompt-only batch as ``input_ids`` and ``attention_mask`` right-padded (:func:`packed_left`)."""
    input_ids, attention_mask = packed_left(batch["input_ids"], batch["attention_mask"])
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def stop_ids_of(model: nn.Module, stop_token_ids: Sequence[int] | None = None, eos: int | None = None) -> list[int]:
    """The ids that end a row: ``stop_token_ids`` when given, else the generation config's ``eos_token_id`` (one
    id or a list, as chat models have: EOS and an end-of-turn token) and ``eos``."""
    if stop_token_ids:
        return list(dict.fromkeys(int(i) for i in stop_token_ids))
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return list(dict.fromkeys(int(i) for i in [*ids, *([eos] if eos is not None else [])]))


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Draw from a fresh generator seeded with ``seed`` inside, and leave the global RNG as it was (None: as is)."""
    if seed is None:
        yield
        return
    devices = (
        [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def continue_prompts(
    model: nn.Module,
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    *,
    max_new_tokens: int,
    ignore_index: int = -100,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    synced_gpus: bool | None = None,
    stop_token_ids: Sequence[int] | None = None,
) -> Continuations:
    """Continue row ``i``'s first ``prompt_lengths[i]`` tokens of ``input_ids`` by up to ``max_new_tokens``.

    The model generates in eval mode (no dropout) with its KV cache, and is put back in the mode it was in.
    Prompts of different lengths are left-padded for ``generate`` (which derives the positions from the
    attention mask) and packed back to the left afterwards, so that the training forward pass sees each row
    at its natural positions. Each row stops at the first of the stop ids (all of them are given to
    ``generate``, which stops when every row has ended); that token is kept and counted, what follows is not.

    Args:
        model: a Hugging Face causal LM (see :func:`can_generate`).
        input_ids: ``(B, T)`` token ids whose prefixes are the prompts.
        prompt_lengths: ``(B,)`` prompt tokens per row, each in ``[1, T]``.
        max_new_tokens: tokens to generate per row (fewer when every row has ended with end-of-sequence).
        ignore_index: the label of positions that are not generated tokens.
        do_sample: sample (True) or decode greedily.
        temperature, top_p: sampling temperature and nucleus mass.
        seed: seeds the sampling without touching the global RNG (None: draw from the global RNG).
        synced_gpus: keep decoding until every process stops (ZeRO-3); None lets Hugging Face decide.
        stop_token_ids: the ids that end a row (EOS, end of turn); None: the generation config's (see
            :func:`stop_ids_of`).
    """
    width = int(prompt_lengths.max())
    config = model.generation_config
    stops = stop_ids_of(model, stop_token_ids)
    pad = config.pad_token_id if config.pad_token_id is not None else (stops[0] if stops else 0)
    # Left-pad: row i's prompt sits in the last prompt_lengths[i] of `width` columns.
    offset = (width - prompt_lengths).unsqueeze(1)  # (B, 1) padding columns before each prompt
    source = torch.arange(width, device=input_ids.device).unsqueeze(0) - offset
    in_prompt = source >= 0
    prompts = torch.where(in_prompt, input_ids.gather(1, source.clamp(min=0)), pad)
    sampling = {"temperature": temperature, "top_p": top_p} if do_sample else {}
    training = model.training
    model.eval()
    try:
        with seeded(seed, input_ids.device):
            sequences = model.generate(
                input_ids=prompts,
                attention_mask=in_prompt.long(),
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                pad_token_id=pad,
                eos_token_id=stops or None,
                synced_gpus=synced_gpus,
                **sampling,
            )
    finally:
        model.train(training)
    generated = sequences[:, width:]
    keep = torch.ones_like(generated, dtype=torch.bool)
    if stops:  # keep the first stop token itself, drop what follows it (padding too, even when pad == EOS)
        is_stop = torch.isin(generated, torch.tensor(stops, device=generated.device)).long()
        keep = (is_stop.cumsum(1) - is_stop) == 0
    # Pack left: shift row i by its padding, so its prompt starts at column 0.
    mask = torch.cat([in_prompt, keep], 1)
    length = sequences.shape[1]
    index = torch.arange(length, device=input_ids.device).unsqueeze(0) + offset
    inside = index < length
    index = index.clamp(max=length - 1)
    mask = mask.gather(1, index) & inside
    ids = torch.where(mask, sequences.gather(1, index), pad)
    is_generated = mask & (torch.arange(length, device=input_ids.device).unsqueeze(0) >= prompt_lengths.unsqueeze(1))
    labels = torch.where(is_generated, ids, ignore_index)
    return Continuations(ids, mask.long(), labels, is_generated.sum(1))
