"""Text for distillation as fixed-length packed sequences: the data module and packing.

The corpus (``corpus.py``), the tokenizer (``tokenizers.py``), the prepared corpus (``prepared.py``) and the
resumable shuffle (``shuffle.py``) live beside this file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .cache_dir import default_cache_dir, writable_dir
from .corpus import BUNDLED_CORPUS, read_documents, split_documents
from .prepared import (
    FORMAT_VERSION,
    META,
    TOKENIZER_DIR,
    PreparedText,
    check_num_proc,
    open_prepared,
    prepare_text,
)
from .prepared_rows import PreparedRows
from .shuffle import EpochShuffle, ShuffledDataModule  # noqa: F401  (their old home)
from .tokenizers import TokenizerProperties, load_tokenizer, tokenizer_hash, train_bpe


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
    """Rows of a ``(sequences, seq_len)`` tensor as ``{"input_ids": row}`` items (int64)."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[index].long()}


class TextDataModule(TokenizerProperties, ShuffledDataModule):
    """Packed fixed-length token sequences for causal-LM training and distillation.

    The corpus is prepared once (tokenized into a prepared directory under ``cache_dir``, keyed by the files'
    paths, sizes and times, the tokenizer and the settings; see ``prepared.py``) and read a row at a time: the
    second run on the same corpus tokenizes nothing, and memory does not grow with the corpus. ``prepared``
    reads a directory ``lit-distill prepare`` wrote. Quick runs (``max_train_tokens``) tokenize only the leading
    documents they keep, in memory (or, with ``prepared``, read its first rows).

    Args:
        files: text files (``.txt``, ``.jsonl``, ``.parquet``, gzipped txt/jsonl); None uses the bundled corpus.
        tokenizer: a Hugging Face tokenizer name or local directory; None trains a byte-level BPE of
            ``vocab_size`` tokens on the training split (cached under ``cache_dir``), or, with ``prepared``,
            uses the tokenizer saved with it.
        vocab_size: size of the trained BPE (ignored with ``tokenizer``).
        seq_len: tokens per sequence.
        batch_size: sequences per batch.
        val_fraction: fraction of whole documents held out for validation.
        num_workers: DataLoader workers.
        text_field: the text field of jsonl/parquet records.
        cache_dir: where trained tokenizers and prepared corpora are cached (default: :func:`default_cache_dir`).
        max_train_tokens: keep only this many training tokens (quick runs); None keeps all.
        prepared: a prepared directory to read (instead of ``files``); checked against ``tokenizer`` and
            ``seq_len``.
        num_proc: processes that tokenize when the corpus is prepared (None: one, with the tokenizer's threads).
        teacher_tokenizer: the teacher's tokenizer (a name or directory, or a tokenizer) when it is not the
            student's: ``tokenizer`` is then the student's, and the loaders' ``collate_fn`` is a
            :class:`~lit_distill.data.cross_tokenizer.CrossTokenizerCollator` that adds the teacher's tokens of
            each row's text, the byte-aligned pairs and chunks (in the DataLoader workers).

    Raises:
        FileNotFoundError, ValueError, OSError, PermissionError: missing or empty corpus, text shorter than
            one sequence, a tokenizer that cannot be found offline, a cache directory that is not writable, a
            prepared directory of another tokenizer or ``seq_len`` or with a damaged file.

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
        prepared: str | None = None,
        num_proc: int | None = None,
        teacher_tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        if seq_len < 2 or batch_size < 1 or vocab_size < 258:
            raise ValueError(
                f"need seq_len >= 2, batch_size >= 1 and vocab_size >= 258; got {seq_len}, {batch_size}, {vocab_size}"
            )
        check_num_proc(num_proc)
        if prepared and files:
            raise ValueError(f"pass files or prepared, not both (got files={files}, prepared={prepared!r})")
        self.files, self.tokenizer_name, self.bpe_size = files, tokenizer, vocab_size
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        self.num_workers, self.text_field, self.max_train_tokens = num_workers, text_field, max_train_tokens
        self.num_proc = num_proc
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._documents: tuple[list[str], list[str]] | None = None
        self.meta: PreparedText | None = None
        self.train_set = self.val_set = None
        for name in files or []:  # a bad option now, not when training starts
            if not Path(name).is_file():
                raise FileNotFoundError(f"corpus file {name} does not exist")
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
        if prepared:
            self.prepared_dir = Path(prepared)
            PreparedText.read(self.prepared_dir)  # a clear error now for a directory that is not one
        elif max_train_tokens is None:
            self.prepared_dir = self.cache_dir / "prepared" / self._prepared_key()
        else:
            self.prepared_dir = None  # a quick run: packed in memory
        if self.tokenizer is None and self.prepared_dir is not None and (self.prepared_dir / META).exists():
            self.tokenizer = load_tokenizer(str(self.prepared_dir / TOKENIZER_DIR))  # the BPE saved with the rows
        elif self.tokenizer is None:
            self.tokenizer = train_bpe(self.train_documents, vocab_size, self.cache_dir)
        self.teacher_tokenizer = self.collate = None
        if teacher_tokenizer is not None:
            from .cross_tokenizer.collate import CrossTokenizerCollator

            self.teacher_tokenizer = (
                load_tokenizer(teacher_tokenizer) if isinstance(teacher_tokenizer, str) else teacher_tokenizer
            )
            self.collate = CrossTokenizerCollator(self.tokenizer, self.teacher_tokenizer)

    def _prepared_key(self) -> str:
        """The cache key of this corpus prepared with these settings: the files by path, size and time (the
        second run reads nothing to find it), the tokenizer (by hash; a BPE trained on the corpus by its size),
        seq_len, the split and the format."""
        key = hashlib.sha256(f"{FORMAT_VERSION}\0{self.seq_len}\0{self.val_fraction}\0{self.text_field}".encode())
        key.update(f"\0{tokenizer_hash(self.tokenizer) if self.tokenizer else f'bpe-{self.bpe_size}'}".encode())
        for name in self.files or [str(BUNDLED_CORPUS)]:
            path = Path(name)
            stat = path.stat()
            key.update(f"\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        return key.hexdigest()[:32]

    @property
    def train_documents(self) -> list[str]:
        """The training documents, read on demand (a prepared corpus does not need them)."""
        return self._split_documents()[0]

    @property
    def val_documents(self) -> list[str]:
        return self._split_documents()[1]

    def _split_documents(self) -> tuple[list[str], list[str]]:
        if self._documents is None:
            self._documents = split_documents(read_documents(self.files, self.text_field), self.val_fraction)
        return self._documents

    @property
    def fingerprint(self) -> str:
        """What the training rows are (the prepared directory's fingerprint; "" for a quick in-memory run)."""
        self.setup()
        rows = self.meta.fingerprint if self.meta is not None else ""
        if self.teacher_tokenizer is None:
            return rows
        # the batches hold the teacher's tokens too: a teacher cache of them is another pair's with another teacher
        return hashlib.sha256(f"{rows}\0{tokenizer_hash(self.teacher_tokenizer)}".encode()).hexdigest()[:32]

    def prepare_data(self) -> None:
        """Prepare the corpus into the cache once (Lightning calls it on one process per machine first)."""
        if self.prepared_dir is None or (self.prepared_dir / META).exists():
            return
        writable_dir(self.prepared_dir.parent)
        try:
            prepare_text(
                self.files, self.tokenizer, self.prepared_dir, seq_len=self.seq_len, val_fraction=self.val_fraction,
                text_field=self.text_field, num_proc=self.num_proc,
            )  # fmt: skip
        except FileExistsError:  # another process (a rank, a test worker) prepared the same corpus a moment ago
            if not (self.prepared_dir / META).exists():
                raise

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.prepared_dir is None:
            self._pack_in_memory()
            return
        self.prepare_data()
        self.meta = open_prepared(self.prepared_dir, self.tokenizer, self.seq_len)
        kept = max(1, self.max_train_tokens // self.seq_len) if self.max_train_tokens is not None else None
        self.train_set = PreparedRows(self.prepared_dir, "train", self.meta, limit=kept)
        self.val_set = PreparedRows(self.prepared_dir, "val", self.meta)

    def _pack_in_memory(self) -> None:
        blocks = max(1, self.max_train_tokens // self.seq_len)
        documents = _leading_documents(self.train_documents, self.tokenizer, blocks * self.seq_len)
        train = pack(documents, self.tokenizer, self.seq_len, "training")[:blocks]
        val = pack(self.val_documents, self.tokenizer, self.seq_len, "validation")
        self.train_set, self.val_set = TokenBlocks(train), TokenBlocks(val)

    @property
    def train_blocks(self) -> torch.Tensor:
        """The training rows as a ``(sequences, seq_len)`` tensor (memory-mapped ``uint16``/``uint32`` when
        prepared: index it, then ``.long()`` the rows you read)."""
        self.setup()
        return self.train_set.blocks

    @property
    def val_blocks(self) -> torch.Tensor:
        self.setup()
        return self.val_set.blocks

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self.shuffled_loader(self.train_set, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.val_set, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=self.collate
        )

    def describe(self) -> dict[str, Any]:
        """Sizes of the splits, for logs and tables."""
        self.setup()
        counts = self.meta.documents if self.meta is not None else None
        teacher = {"teacher_tokenizer": tokenizer_hash(self.teacher_tokenizer)} if self.teacher_tokenizer else {}
        return {
            "train_documents": counts["train"] if counts else len(self.train_documents),
            "val_documents": counts["val"] if counts else len(self.val_documents),
            "train_tokens": self.train_blocks.numel(),
            "val_tokens": self.val_blocks.numel(),
            "vocab_size": self.vocab_size,
            **teacher,
        }
