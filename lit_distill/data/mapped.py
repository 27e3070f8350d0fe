"""What chat data and prompt sets share: a tokenizer with a chat template, rows tokenized once through
``datasets``' map cache, a seeded held-out split, the resumable shuffle, and the loaders.

Subclasses say how a source becomes rows (:meth:`MappedDataModule._encoded`, through :meth:`_mapped`) and which
rows stay (:meth:`_kept`); ``collate`` builds their batches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from .cache_dir import default_cache_dir, writable_dir
from .chat_formats import load_source
from .chat_template import stop_ids
from .prepared import check_num_proc
from .text import ShuffledDataModule
from .tokenizers import TokenizerProperties, load_tokenizer

#: the files whose code decides the rows: part of every cache key (new code, new rows)
_CODE = ("mapped.py", "chat.py", "prompts.py", "chat_formats.py", "chat_template.py")


class MappedDataModule(TokenizerProperties, ShuffledDataModule):
    """The shared part of :class:`~lit_distill.data.ChatDataModule` and :class:`~lit_distill.data.PromptDataModule`
    (see them for the arguments)."""

    #: how the counts are logged ("chat data", "prompt data")
    what = "data"

    def __init__(
        self, train: str | None, val: str | None, tokenizer: str | None, chat_template: str | None, batch_size: int,
        num_workers: int, num_proc: int | None, seed: int, val_fraction: float, split: str, val_split: str,
        cache_dir: str | None,
    ) -> None:  # fmt: skip
        super().__init__()
        if batch_size < 1 or not 0 <= val_fraction < 1:
            raise ValueError(f"need batch_size >= 1 and 0 <= val_fraction < 1; got {batch_size}, {val_fraction}")
        check_num_proc(num_proc)
        if tokenizer is None:
            raise ValueError(
                f"{type(self).__name__} needs tokenizer= (a name or directory): the teacher's, whose chat template"
                " renders the conversations"
            )
        self.train, self.val, self.chat_template = train, val, chat_template
        self.split, self.val_split = split, val_split
        self.batch_size, self.num_workers, self.num_proc = batch_size, num_workers, num_proc
        self.seed, self.val_fraction = seed, val_fraction
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.tokenizer = load_tokenizer(tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.train_set = self.val_set = None
        self.summary: dict[str, dict[str, int]] = {}

    @property
    def stop_token_ids(self) -> list[int]:
        """The tokenizer's EOS and the template's end-of-turn token: where a reply ends (on-policy generation)."""
        return stop_ids(self.tokenizer, self.chat_template)

    def prepare_data(self) -> None:
        self._prepare()  # once per machine, before setup: the other processes read the map cache it writes

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.summary = self._prepare()
            self.train_set = self._training_rows(self.train_set)
            for name, counts in self.summary.items():
                rank_zero_info(f"{self.what}, {name}: " + ", ".join(f"{v:,} {k}" for k, v in counts.items()))

    def _training_rows(self, rows):
        """The training split as the loader reads it (packing regroups it); as it is by default."""
        return rows

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self.shuffled_loader(self.train_set, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, self.batch_size, num_workers=self.num_workers, collate_fn=self.collate)

    def describe(self) -> dict[str, Any]:
        """The counts of each split (rows, tokens, truncated, dropped, ...), for logs and tables."""
        self.setup()
        return {**self.summary, "vocab_size": self.vocab_size}

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

    def _source(self, source: str, split: str):
        """The dataset ``source`` as ``datasets`` reads it (files cached under ``cache_dir`` when given)."""
        return load_source(source, split, self.cache_dir / "datasets" if self.cache_dir else None)

    def _mapped(self, dataset, source: str, encoder, key_parts: tuple[str, ...], folder: str):
        """``dataset`` through ``encoder`` (batched, with indices), cached under a key of the data's fingerprint,
        ``key_parts`` (format, template, options), the tokenizer's definition and this code."""
        key = hashlib.sha256()
        for part in (dataset._fingerprint, *key_parts):
            key.update(part.encode() + b"\0")
        key.update(_tokenizer_identity(self.tokenizer))
        for name in _CODE:
            key.update((Path(__file__).parent / name).read_bytes())
        fingerprint = key.hexdigest()[:32]
        directory = writable_dir((self.cache_dir or default_cache_dir()) / folder)
        return dataset.map(
            encoder, batched=True, with_indices=True, remove_columns=dataset.column_names, num_proc=self.num_proc,
            new_fingerprint=fingerprint, cache_file_name=str(directory / f"{fingerprint}.arrow"),
            desc=f"tokenizing {Path(source).name}",
        )  # fmt: skip

    def _encoded(self, source: str, split: str):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def _kept(self, dataset, name: str):  # pragma: no cover - every subclass defines it
        raise NotImplementedError


def _tokenizer_identity(tokenizer) -> bytes:
    """What the rows depend on in a tokenizer: its whole definition and which tokens are special."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return f"{type(tokenizer).__name__}\0{definition}\0{sorted(tokenizer.special_tokens_map.items())}".encode()
