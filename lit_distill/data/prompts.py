"""Prompt sets for on-policy distillation: prompts through the tokenizer's chat template, with its generation
prompt, into left-padded batches the student continues (``PromptDataModule``).

Batches are dicts of ``(B, P)`` tensors, every one of them on-policy (there is nothing else to learn from):

- ``input_ids``: the rendered prompts, LEFT-padded with the pad id (EOS when the tokenizer has none), so that
  every prompt ends in the last column, where generation starts;
- ``attention_mask``: 1 on prompt tokens, 0 on padding;
- ``prompt_mask``: bool, True on every prompt token: equal to ``attention_mask``, which is how
  ``OnPolicyDistillation`` and ``OnPolicyEvaluation`` recognise a prompt-only batch.

There are no ``labels``: the labels of an on-policy batch are the tokens the student generates. Nothing is
shifted here (the modules shift). The formats are ``chat_formats.py``'s, read as prompts: ``prompt`` (a string,
one user turn, or a message list; a ``completion`` beside it is ignored) or a conversation (``messages``,
ShareGPT ``conversations``) whose last turn, when it is an assistant's, is dropped (TRL GKD's ``messages[:-1]``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .chat_formats import detect_format, normalize
from .chat_template import _render, _tokenize, resolve_template
from .mapped import MappedDataModule

TRUNCATION = ("keep_end", "drop")


class LeftPadCollate:
    """Left-pads a list of rows (``input_ids``, lists or arrays) into the batch dict above, each row cut to its
    last ``max_length`` tokens (None: whole)."""

    def __init__(self, pad_id: int, max_length: int | None = None) -> None:
        self.pad_id, self.max_length = pad_id, max_length

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if self.max_length is not None:
            rows = [{"input_ids": row["input_ids"][-self.max_length :]} for row in rows]
        lengths = [len(row["input_ids"]) for row in rows]
        width = max(lengths)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            input_ids[i, width - length :] = torch.tensor(row["input_ids"])  # a copy: Arrow's arrays are read-only
            mask[i, width - length :] = True
        return {"input_ids": input_ids, "attention_mask": mask.long(), "prompt_mask": mask}


def prompt_messages(row: dict[str, Any], fmt: str, index: int, where: str) -> list[dict[str, Any]]:
    """Row ``index`` of ``where`` as the messages of a prompt (see the module docstring).

    Raises:
        ValueError: plain text, a bad role or message (from ``normalize``), an empty prompt; each names the row.
    """
    if fmt == "prompt":
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        messages = normalize({"messages": prompt}, "messages", index, where).messages
    elif fmt == "text":
        raise ValueError(
            f"{where} is plain text ('text'); a prompt set needs 'prompt' (a string or messages) or conversations"
            " ('messages', 'conversations') whose last assistant turn is dropped"
        )
    else:
        messages = normalize(row, fmt, index, where).messages
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
    if not messages:
        raise ValueError(f"row {index} of {where} leaves an empty prompt (nothing before its last assistant turn)")
    return messages


class _Encoder:
    """The ``Dataset.map`` function (batched, with indices): rows to ``input_ids`` (the whole rendered prompt)."""

    def __init__(self, tokenizer, template: str, fmt: str, where: str) -> None:
        self.tokenizer, self.template, self.fmt, self.where = tokenizer, template, fmt, where

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        ids = []
        for k, index in enumerate(indices):
            messages = prompt_messages({c: v[k] for c, v in batch.items()}, self.fmt, index, self.where)
            # Rendered with the generation prompt, tokenized without special tokens: the template wrote BOS.
            ids.append(_tokenize(self.tokenizer, _render(self.tokenizer, self.template, messages, True)))
        return {"input_ids": ids}


class PromptDataModule(MappedDataModule):
    """Prompts as left-padded batches for on-policy distillation: every batch is on-policy (the student
    continues each prompt; there are no completions to distill on), so ``OnPolicyDistillation`` needs
    ``lmbda=1``. See docs/data.md.

    Args:
        train: a data file (jsonl/json/parquet/csv/arrow), a ``save_to_disk`` directory, or a Hub name.
        val: the same for validation; None holds out ``val_fraction`` of ``train``'s prompts (seeded).
        tokenizer: a Hugging Face tokenizer name or directory (the teacher's); required.
        chat_template: a Jinja file overriding the tokenizer's chat template.
        max_prompt_length: prompt tokens at most.
        truncation: ``"keep_end"`` keeps a longer prompt's last ``max_prompt_length`` tokens (the end holds the
            generation prompt the student continues); ``"drop"`` drops it (counted in the summary).
        batch_size: prompts per batch. num_workers: DataLoader workers.
        num_proc: processes tokenizing (``Dataset.map``); None tokenizes in this process.
        seed: the seed of the held-out split (the shuffle follows ``seed_everything``).
        val_fraction: the share of ``train`` held out when ``val`` is None (0: no validation).
        split, val_split: the splits of ``train`` and ``val`` when they are Hub datasets or saved ``DatasetDict``s.
        cache_dir: where the tokenized rows (and files read by ``datasets``) are cached.

    Attributes:
        stop_token_ids: the ids generation should stop at: the tokenizer's EOS and the template's end-of-turn
            token (:func:`~lit_distill.data.chat_template.end_of_turn_ids`), for
            ``OnPolicyDistillation(stop_token_ids=...)``.

    Raises:
        ValueError, FileNotFoundError, ConnectionError: bad options at construction; at setup, data in no known
            format (or plain text), a bad role, an empty prompt, a tokenizer without a chat template, every
            prompt dropped by ``truncation="drop"``, a Hub that cannot be reached.

    Example:
        >>> data = PromptDataModule("prompts.jsonl", tokenizer="artifacts/teacher", max_prompt_length=512)
    """

    what = "prompt data"

    def __init__(
        self,
        train: str,
        val: str | None = None,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        max_prompt_length: int = 512,
        truncation: str = "keep_end",
        batch_size: int = 8,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 0,
        val_fraction: float = 0.05,
        split: str = "train",
        val_split: str = "validation",
        cache_dir: str | None = None,
    ) -> None:
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
        if max_prompt_length < 1:
            raise ValueError(f"need max_prompt_length >= 1, got {max_prompt_length}")
        super().__init__(
            train, val, tokenizer, chat_template, batch_size, num_workers, num_proc, seed, val_fraction, split,
            val_split, cache_dir,
        )  # fmt: skip
        self.max_prompt_length, self.truncation = max_prompt_length, truncation
        # keep_end cuts in the collate: the cached rows stay whole, whatever max_prompt_length a run takes.
        self.collate = LeftPadCollate(self.pad_id, max_prompt_length)

    def _encoded(self, source: str, split: str):
        """The dataset ``source`` tokenized (whole prompts), from the map cache when it is there."""
        dataset = self._source(source, split)
        fmt = "prompt" if "prompt" in dataset.column_names else detect_format(dataset.column_names, source)
        template = resolve_template(self.tokenizer, self.chat_template)
        return self._mapped(
            dataset, source, _Encoder(self.tokenizer, template, fmt, source), (fmt, template), "prompts"
        )

    def _kept(self, dataset, name: str):
        """(the rows that stay under ``truncation``, {name: counts}); ``keep_end`` cuts in the collate."""
        import pyarrow.compute as pc  # the lengths from Arrow's offsets, not a Python list per prompt

        lengths = pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_numpy(zero_copy_only=False)
        over = lengths > self.max_prompt_length
        keep = np.flatnonzero(~over) if self.truncation == "drop" else np.arange(len(dataset))
        if len(dataset) and not len(keep):
            raise ValueError(
                f"every one of the {len(dataset)} {name} prompts is longer than max_prompt_length="
                f"{self.max_prompt_length} tokens and was dropped (truncation='drop'); raise max_prompt_length"
                " or use truncation='keep_end'"
            )
        kept = dataset if len(keep) == len(dataset) else dataset.select(keep)
        counts = {
            "prompts": len(dataset),
            "rows": len(keep),
            "tokens": int(np.minimum(lengths, self.max_prompt_length)[keep].sum()),
            "truncated": int(over[keep].sum()),
            "dropped": int(len(dataset) - len(keep)),
        }
        return kept.with_format("numpy", columns=["input_ids"]), {name: counts}
