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

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from .cache_dir import default_cache_dir, writable_dir
from .chat import _tokenizer_identity
from .chat_formats import detect_format, load_source, normalize

# end_of_turn_ids moved to chat_template.py (shared with ChatDataModule); still importable from here
from .chat_template import _render, _tokenize, end_of_turn_ids, resolve_template, stop_ids  # noqa: F401
from .text import ShuffledDataModule
from .tokenizers import load_tokenizer, special_token_ids

TRUNCATION = ("keep_end", "drop")
_CODE = ("prompts.py", "chat_formats.py", "chat_template.py")  # part of the cache key: new code, new rows


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


class PromptDataModule(ShuffledDataModule):
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
            token (:func:`end_of_turn_ids`), for ``OnPolicyDistillation(stop_token_ids=...)``.

    Raises:
        ValueError, FileNotFoundError, ConnectionError: bad options at construction; at setup, data in no known
            format (or plain text), a bad role, an empty prompt, a tokenizer without a chat template, every
            prompt dropped by ``truncation="drop"``, a Hub that cannot be reached.

    Example:
        >>> data = PromptDataModule("prompts.jsonl", tokenizer="artifacts/teacher", max_prompt_length=512)
    """

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
        super().__init__()
        if truncation not in TRUNCATION:
            raise ValueError(f"truncation must be one of {TRUNCATION}, got {truncation!r}")
        if max_prompt_length < 1 or batch_size < 1 or not 0 <= val_fraction < 1:
            raise ValueError(
                f"need max_prompt_length >= 1, batch_size >= 1 and 0 <= val_fraction < 1; got {max_prompt_length},"
                f" {batch_size}, {val_fraction}"
            )
        if tokenizer is None:
            raise ValueError(
                "PromptDataModule needs tokenizer= (a name or directory): the teacher's, whose chat template renders"
                " the prompts"
            )
        self.train, self.val, self.chat_template = train, val, chat_template
        self.split, self.val_split = split, val_split
        self.max_prompt_length, self.truncation = max_prompt_length, truncation
        self.batch_size, self.num_workers, self.num_proc = batch_size, num_workers, num_proc
        self.seed, self.val_fraction = seed, val_fraction
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.tokenizer = load_tokenizer(tokenizer)
        pad = self.tokenizer.pad_token_id
        # keep_end cuts in the collate: the cached rows stay whole, whatever max_prompt_length a run takes.
        self.collate = LeftPadCollate(pad if pad is not None else self.tokenizer.eos_token_id, max_prompt_length)
        self.train_set = self.val_set = None
        self.summary: dict[str, dict[str, int]] = {}

    @property
    def vocab_size(self) -> int:
        """Token ids the models must cover (the tokenizer's size, special tokens included)."""
        return len(self.tokenizer)

    @property
    def special_tokens(self) -> dict[str, int]:
        """The tokenizer's ``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` (those it has)."""
        return special_token_ids(self.tokenizer)

    @property
    def stop_token_ids(self) -> list[int]:
        """The tokenizer's EOS and the template's end-of-turn token: where the student's replies end."""
        return stop_ids(self.tokenizer, self.chat_template)

    def prepare_data(self) -> None:
        self._prepare()  # once per machine, before setup: the other processes read the map cache it writes

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.summary = self._prepare()
            for name, counts in self.summary.items():
                rank_zero_info(f"prompt data, {name}: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()))

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self.shuffled_loader(self.train_set, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers, collate_fn=self.collate)

    def describe(self) -> dict[str, Any]:
        """The counts of each split (prompts, rows, tokens, truncated, dropped), for logs and tables."""
        self.setup()
        return {**self.summary, "vocab_size": self.vocab_size}

    # ------------------------------------------------------------------------------------------ preparing
    def _prepare(self):
        """(train rows, val rows or None, counts per split): read, tokenize through the map cache, split, cut."""
        train = self._encoded(self.train, self.split)
        if self.val is not None:
            val = self._encoded(self.val, self.val_split)
        elif self.val_fraction > 0:
            order = np.random.default_rng(self.seed).permutation(len(train))
            held = max(1, round(len(train) * self.val_fraction))
            train, val = train.select(np.sort(order[held:])), train.select(np.sort(order[:held]))
        else:
            val = None
        train, summary = self._kept(train, "train")
        if val is not None:
            val, counts = self._kept(val, "val")
            summary.update(counts)
        return train, val, summary

    def _encoded(self, source: str, split: str):
        """The dataset ``source`` tokenized (whole prompts), from the map cache when it is there."""
        dataset = load_source(source, split, self.cache_dir / "datasets" if self.cache_dir else None)
        columns = dataset.column_names
        fmt = "prompt" if "prompt" in columns else detect_format(columns, source)
        template = resolve_template(self.tokenizer, self.chat_template)
        key = hashlib.sha256()
        for part in (dataset._fingerprint, fmt, template):
            key.update(part.encode() + b"\0")
        key.update(_tokenizer_identity(self.tokenizer))
        for name in _CODE:
            key.update((Path(__file__).parent / name).read_bytes())
        fingerprint = key.hexdigest()[:32]
        directory = writable_dir((self.cache_dir or default_cache_dir()) / "prompts")
        return dataset.map(
            _Encoder(self.tokenizer, template, fmt, source), batched=True, with_indices=True,
            remove_columns=columns, num_proc=self.num_proc, new_fingerprint=fingerprint,
            cache_file_name=str(directory / f"{fingerprint}.arrow"), desc=f"tokenizing {Path(source).name}",
        )  # fmt: skip

    def _kept(self, dataset, name: str):
        """(the rows that stay under ``truncation``, {name: counts}); ``keep_end`` cuts in the collate."""
        lengths = np.asarray([len(ids) for ids in dataset["input_ids"]])
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
