"""Text for distillation as fixed-length packed sequences: the data module, its resumable shuffle, packing.

The corpus (``corpus.py``) and the tokenizer (``tokenizers.py``) live beside this file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .cache_dir import default_cache_dir
from .corpus import read_documents, split_documents
from .tokenizers import load_tokenizer, special_token_ids, train_bpe


def pack(documents: list[str], tokenizer, seq_len: int, what: str) -> torch.Tensor:
    """Token ids of the documents, each followed by end-of-sequence, cut into ``(blocks, seq_len)``."""
    encoded = tokenizer(documents, add_special_tokens=False)["input_ids"]
    ids = [token for doc in encoded for token in (*doc, tokenizer.eos_token_id)]
    blocks = len(ids) // seq_len
    if blocks == 0:
        raise ValueError(
            f"the {what} text has {len(ids)} tokens, fewer than one sequence of seq_len={seq_len};"
            " use more text or a shorter seq_len"
        )
    return torch.tensor(ids[: blocks * seq_len], dtype=torch.long).view(blocks, seq_len)


def _leading_documents(documents: list[str], tokenizer, tokens: int) -> list[str]:
    """The first documents that hold ``tokens`` tokens with their EOS (all of them if they do not): ``pack`` of
    them starts with the same blocks as ``pack`` of all."""
    total = 0
    for count, document in enumerate(documents, 1):
        total += len(tokenizer(document, add_special_tokens=False)["input_ids"]) + 1
        if total >= tokens:
            return documents[:count]
    return documents


class TokenBlocks(Dataset):
    """Rows of a ``(sequences, seq_len)`` tensor as ``{"input_ids": row}`` items."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index]}


class EpochShuffle(Sampler[int]):
    """``RandomSampler``'s order, made resumable in the middle of an epoch.

    The first epoch's seed is drawn from the global RNG as ``RandomSampler`` draws it (so ``seed_everything``
    decides it and the first epoch's order is the same), epoch ``e`` uses ``seed + e``, and the seed is saved
    in checkpoints with the data module. After a resume in the middle of an epoch, the batches already
    trained on (``batches_done()``, from Lightning's progress) are not drawn again: the resumed run sees
    exactly the batches the uninterrupted run would have.
    """

    def __init__(self, size: int, batch_size: int, batches_done: Callable[[], int]) -> None:
        self.size, self.batch_size, self.batches_done = size, batch_size, batches_done
        self.seed: int | None = None
        self.epoch = 0
        self.resuming = False

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it before every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if self.seed is None:
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        skip = self.batches_done() * self.batch_size if self.resuming else 0
        self.resuming = False
        return iter(order[skip:])


class ShuffledDataModule(pl.LightningDataModule):
    """A data module whose training batches come in :class:`EpochShuffle`'s order, resumable mid-epoch: the
    shuffle seed is saved in checkpoints. Subclasses set ``batch_size`` and ``num_workers``."""

    def __init__(self) -> None:
        super().__init__()
        self.sampler: EpochShuffle | None = None
        self._resumed_seed: int | None = None

    def shuffled_loader(self, dataset: Dataset, collate_fn: Callable | None = None) -> DataLoader:
        """The training DataLoader of ``dataset`` (``collate_fn``: how rows become a batch; default stacking)."""
        common = {"drop_last": True, "num_workers": self.num_workers, "collate_fn": collate_fn}
        if self.trainer is not None and self.trainer.world_size > 1:
            # Lightning swaps in a DistributedSampler (one order per epoch); a resume restarts the epoch.
            return DataLoader(dataset, self.batch_size, shuffle=True, **common)
        self.sampler = EpochShuffle(len(dataset), self.batch_size, self._batches_done)
        if self._resumed_seed is not None:
            self.sampler.seed, self.sampler.resuming = self._resumed_seed, True
            self._resumed_seed = None
        return DataLoader(dataset, self.batch_size, sampler=self.sampler, **common)

    def _batches_done(self) -> int:
        """Batches of the current epoch the trainer has finished (restored from a checkpoint on resume)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self.trainer is not None else 0

    def state_dict(self) -> dict[str, Any]:
        return {"shuffle_seed": self.sampler.seed} if self.sampler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_seed = state_dict.get("shuffle_seed")


class TextDataModule(ShuffledDataModule):
    """Packed fixed-length token sequences for causal-LM training and distillation.

    Args:
        files: text files (``.txt``, ``.jsonl``, ``.parquet``, gzipped txt/jsonl); None uses the bundled corpus.
        tokenizer: a Hugging Face tokenizer name or local directory; None trains a byte-level BPE of
            ``vocab_size`` tokens on the training split (cached under ``cache_dir``).
        vocab_size: size of the trained BPE (ignored with ``tokenizer``).
        seq_len: tokens per sequence.
        batch_size: sequences per batch.
        val_fraction: fraction of whole documents held out for validation.
        num_workers: DataLoader workers.
        text_field: the text field of jsonl/parquet records.
        cache_dir: where trained tokenizers are cached (default: see :func:`default_cache_dir`).
        max_train_tokens: keep only this many training tokens (quick runs); None keeps all.

    Raises:
        FileNotFoundError, ValueError, OSError, PermissionError: missing or empty corpus, text shorter than
            one sequence, a tokenizer that cannot be found offline, a cache directory that is not writable.

    Example:
        >>> data = TextDataModule(seq_len=128, batch_size=16)   # bundled Shakespeare, BPE of 4096 tokens
        >>> data.vocab_size
        4096
    """

    def __init__(
        self,
        files: list[str] | None = None,
        tokenizer: str | None = None,
        vocab_size: int = 4096,
        seq_len: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        text_field: str = "text",
        cache_dir: str | None = None,
        max_train_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if seq_len < 2 or batch_size < 1 or vocab_size < 258:
            raise ValueError(
                f"need seq_len >= 2, batch_size >= 1 and vocab_size >= 258; got {seq_len}, {batch_size}, {vocab_size}"
            )
        self.files, self.tokenizer_name, self.bpe_size = files, tokenizer, vocab_size
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.num_workers, self.text_field, self.max_train_tokens = num_workers, text_field, max_train_tokens
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.train_documents, self.val_documents = split_documents(read_documents(files, text_field), val_fraction)
        self.tokenizer = (
            load_tokenizer(tokenizer) if tokenizer else train_bpe(self.train_documents, vocab_size, self.cache_dir)
        )
        self.train_blocks: torch.Tensor | None = None
        self.val_blocks: torch.Tensor | None = None

    @property
    def vocab_size(self) -> int:
        """Token ids the models must cover (the tokenizer's size, special tokens included)."""
        return len(self.tokenizer)

    @property
    def special_tokens(self) -> dict[str, int]:
        """The tokenizer's ``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` (those it has), for the
        configs of models built for it (the command line links them to ``model.init_args.special_tokens``)."""
        return special_token_ids(self.tokenizer)

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is None:
            documents = self.train_documents
            if self.max_train_tokens is not None:  # tokenize only the documents the kept blocks come from
                blocks = max(1, self.max_train_tokens // self.seq_len)
                documents = _leading_documents(documents, self.tokenizer, blocks * self.seq_len)
            self.train_blocks = pack(documents, self.tokenizer, self.seq_len, "training")
            if self.max_train_tokens is not None:
                self.train_blocks = self.train_blocks[:blocks]
            self.val_blocks = pack(self.val_documents, self.tokenizer, self.seq_len, "validation")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self.shuffled_loader(TokenBlocks(self.train_blocks))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(TokenBlocks(self.val_blocks), batch_size=self.batch_size, num_workers=self.num_workers)

    def describe(self) -> dict[str, Any]:
        """Sizes of the splits, for logs and tables."""
        self.setup()
        return {
            "train_documents": len(self.train_documents),
            "val_documents": len(self.val_documents),
            "train_tokens": self.train_blocks.numel(),
            "val_tokens": self.val_blocks.numel(),
            "vocab_size": self.vocab_size,
        }
