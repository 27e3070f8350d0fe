"""Training from a teacher cache: ``TeacherCacheDataModule`` checks the cache and serves its shards."""

from __future__ import annotations

import bisect
import itertools
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import DataLoader, Dataset

from ..chat import PadCollate
from ..text import ShuffledDataModule, TokenBlocks
from ..tokenizers import load_tokenizer, special_token_ids
from .manifest import TOKENIZER_DIR, VALIDATION, CacheManifest, CacheSettings, sha256_file, tokenizer_hash
from .rows import CachedRows, HeldOutRows, SignalPadCollate


class _CachedSequences(Dataset):
    """The cached training sequences across shards, read from memory-mapped safetensors files."""

    def __init__(self, directory: Path, manifest: CacheManifest) -> None:
        self.files = [directory / shard["file"] for shard in manifest.shards]
        sizes = [shard["sequences"] for shard in manifest.shards]
        self.firsts = [0, *itertools.accumulate(sizes)][:-1]  # each shard's first sequence
        self.size = sum(shard["sequences"] for shard in manifest.shards)
        self.handles: list[Any] | None = None  # opened lazily, once per DataLoader worker

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.handles is None:
            self.handles = [safe_open(str(f), framework="pt") for f in self.files]
        shard = bisect.bisect_right(self.firsts, index) - 1
        handle, row = self.handles[shard], index - self.firsts[shard]
        input_ids = handle.get_slice("input_ids")[row : row + 1][0].long()
        return {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "teacher_ids": handle.get_slice("teacher_ids")[row : row + 1][0].long(),
            "teacher_logprobs": handle.get_slice("teacher_logprobs")[row : row + 1][0].float(),
        }


class TeacherCacheDataModule(ShuffledDataModule):
    """Batches of cached sequences with their teacher signal, for :class:`~lit_distill.modules.OfflineDistillation`.

    Training batches hold ``input_ids`` ``(B, L)``, ``attention_mask``, ``teacher_ids`` ``(B, L, K)`` (-1 for an
    empty slot) and ``teacher_logprobs`` ``(B, L, K)``; position t's signal is the teacher's distribution of
    token t+1. Validation batches hold the held-out ``input_ids`` (the student's cross-entropy is measured).
    A cache of chat data (``layout == "rows"``) gives the chat batches back, right-padded with ``labels``
    counting the learned tokens only, and the signal at the positions that predict them (empty slots elsewhere);
    its validation batches carry the held-out conversations' ``labels``.
    The order is shuffled and resumable as in :class:`~lit_distill.data.TextDataModule`.

    Args:
        cache_dir: a finished cache (``lit-distill cache-teacher``).
        batch_size: sequences per batch.
        num_workers: DataLoader workers.
        tokenizer: if given (a name or directory), the cache must have been written with this tokenizer.
        verify: check every shard's sha256 against the manifest at setup (reads the whole cache once).

    Raises:
        FileNotFoundError, ValueError: a missing or unfinished cache, or one that does not match: another
            format version, tokenizer or vocabulary, a missing, truncated or corrupt shard. The message
            names the field.
    """

    def __init__(
        self,
        cache_dir: str,
        batch_size: int = 16,
        num_workers: int = 0,
        tokenizer: str | None = None,
        verify: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.directory = Path(cache_dir)
        self.manifest = CacheManifest.read(self.directory)
        self.batch_size, self.num_workers = batch_size, num_workers
        self.tokenizer = load_tokenizer(str(self.directory / TOKENIZER_DIR))
        self._check_tokenizer(tokenizer)
        if verify:
            self._check_shards()
        files = [self.directory / shard["file"] for shard in self.manifest.shards]
        if self.settings.layout == "rows":
            self.train_set = CachedRows(files)
            pad = self.tokenizer.pad_token_id
            self.collate = SignalPadCollate(pad if pad is not None else self.tokenizer.eos_token_id)
        else:
            self.train_set, self.collate = _CachedSequences(self.directory, self.manifest), None
        self.val_blocks: torch.Tensor | None = None
        self.val_rows: HeldOutRows | None = None

    @property
    def settings(self) -> CacheSettings:
        return self.manifest.settings

    @property
    def vocab_size(self) -> int:
        return self.settings.vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return special_token_ids(self.tokenizer)

    def _check_tokenizer(self, expected: str | None) -> None:
        stored = self.settings
        if tokenizer_hash(self.tokenizer) != stored.tokenizer_hash or len(self.tokenizer) != stored.vocab_size:
            raise ValueError(
                f"teacher cache {self.directory}: its tokenizer/ does not match the manifest's tokenizer_hash"
            )
        if expected is None:
            return
        given = tokenizer_hash(load_tokenizer(expected))
        if given == stored.tokenizer_hash:
            return
        if self.manifest.cross_tokenizer:  # the ids are a student's: name the student it was written for
            student = self.manifest.tokenizers.get("student", self.tokenizer.name_or_path)
            raise ValueError(
                f"teacher cache {self.directory} holds its teacher's signal in the ids of the student tokenizer"
                f" {student} (tokenizer_hash {stored.tokenizer_hash[:12]}), not of {expected} ({given[:12]}):"
                " the ids would mean other tokens; write a cache for this student with"
                " `lit-distill cache-teacher --student_tokenizer`"
            )
        raise ValueError(
            f"teacher cache {self.directory} was written with another tokenizer (tokenizer_hash differs from"
            f" {expected}'s): the teacher ids would mean other tokens; write a cache with this tokenizer"
        )

    def _check_shards(self) -> None:
        for shard in self.manifest.shards:
            path = self.directory / shard["file"]
            if not path.exists():
                raise FileNotFoundError(f"teacher cache {self.directory}: shard {shard['file']} is missing")
            if sha256_file(path) != shard["sha256"]:
                raise ValueError(
                    f"teacher cache {self.directory}: shard {shard['file']} is truncated or corrupt (its sha256"
                    " differs from the manifest's); write the cache again"
                )
            try:
                with safe_open(str(path), framework="pt") as f:
                    shape = f.get_slice("teacher_ids").get_shape()
                    if self.settings.layout == "rows":  # rows, and slots at as many positions as it says
                        lengths, signals = f.get_tensor("lengths"), f.get_tensor("signals")
                        sizes = [f.get_slice(name).get_shape()[0] for name in ("input_ids", "counted", "teacher_ids")]
                        whole = sizes == [int(lengths.sum()), int(lengths.sum()), int(signals.sum())]
                        shape = [len(lengths) if whole else -1, shape[-1]]
            except SafetensorError as err:
                raise ValueError(f"teacher cache {self.directory}: shard {shard['file']} is unreadable: {err}") from err
            expected = [shard["sequences"], self.settings.seq_len, self.settings.k]
            if self.settings.layout == "rows":
                expected = [shard["sequences"], self.settings.k]
            if list(shape) != expected:
                raise ValueError(f"teacher cache {self.directory}: shard {shard['file']} holds {shape}, not {expected}")

    def setup(self, stage: str | None = None) -> None:
        if self.settings.layout == "rows":
            if self.val_rows is None:
                self.val_rows = HeldOutRows(self.directory / VALIDATION)
        elif self.val_blocks is None:
            with safe_open(str(self.directory / VALIDATION), framework="pt") as f:
                self.val_blocks = f.get_tensor("input_ids").long()

    def train_dataloader(self) -> DataLoader:
        return self.shuffled_loader(self.train_set, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        if self.val_rows is not None:
            if not len(self.val_rows):
                return []
            collate = PadCollate(self.collate.pad_id)
            return DataLoader(self.val_rows, self.batch_size, num_workers=self.num_workers, collate_fn=collate)
        return DataLoader(TokenBlocks(self.val_blocks), batch_size=self.batch_size, num_workers=self.num_workers)
