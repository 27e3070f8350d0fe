"""Text streamed from files or the Hugging Face Hub, tokenized and packed on the fly: corpora too big to prepare.

``StreamingTextDataModule`` reads documents through ``datasets`` in streaming mode (records as they come, nothing
written to disk), tokenizes them a batch at a time, puts the tokenizer's EOS after each, and cuts the tokens into
rows of ``seq_len`` as ``pack`` in ``text.py`` does (a document's leftover starts the next row).

How one epoch of the stream is shared out:

- non-empty document ``i`` (in stream order) is held out for validation when ``i % k == k // 2``,
  ``k = round(1 / val_fraction)``; validation reads the first ``val_rows`` rows of those, in order, every time;
- the training documents are dealt round-robin to ``world_size * max(1, num_workers)`` readers, one per DataLoader
  worker of each process. Every reader reads the whole stream but tokenizes and packs only its own documents;
- each reader shuffles its rows through a buffer of ``shuffle_buffer`` rows, seeded by (seed, epoch, reader);
- batch ``i`` of a process comes from its worker ``i % num_workers`` (the DataLoader's round-robin), and the epoch
  ends on every process as soon as any reader has no batch left. So all processes run the same number of steps
  (DDP does not hang on uneven shards), the order stays strictly round-robin, and a resume in the middle of an
  epoch is exact: each reader skips the batches of it the trainer already finished.

The cost: memory is bounded by the shuffle buffer and one tokenizer batch, whatever the corpus size; but each
reader reads (not tokenizes) the whole stream, an epoch drops what other readers still hold when the first one runs
out (a few documents' worth each), and resuming re-reads and re-tokenizes the part of the epoch already trained
(only the seed is saved, no position in the stream), which takes as long as reading it did.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .tokenizers import TokenizerProperties, load_tokenizer

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def stream_sources(files: list[str]) -> list[dict[str, Any]]:
    """What ``files`` names, as checkpoints compare it: each file's resolved path and size, or one Hub dataset."""
    from ..models import missing_local_path

    files = [files] if isinstance(files, str) else list(files or [])
    if not files:
        raise ValueError("StreamingTextDataModule needs files: .jsonl/.parquet/.txt files or one Hub dataset name")
    name = files[0]
    looks_like_a_file = set(Path(name).suffixes) & {*BUILDERS, ".gz"}
    if len(files) == 1 and not Path(name).exists() and missing_local_path(name) is None and not looks_like_a_file:
        return [{"hub": name}]
    sources = []
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {name} does not exist")
        sources.append({"path": str(path.resolve()), "bytes": path.stat().st_size})
    return sources


def shuffled(rows: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """``rows`` in a random order drawn through a buffer of ``size``: each new row takes the place of a random
    one in the full buffer, which comes out; the buffer's last rows come out shuffled at the end."""
    buffer: list[Any] = []
    for row in rows:
        if len(buffer) < size:
            buffer.append(row)
            continue
        slot = int(rng.integers(size))
        yield buffer[slot]
        buffer[slot] = row
    rng.shuffle(buffer)
    yield from buffer


@dataclass(frozen=True)
class DocumentStream:
    """What is read and how it is cut into rows: small and picklable, so each DataLoader worker has its own."""

    sources: list[dict[str, Any]]
    text_field: str
    tokenizer: Any
    seq_len: int
    every: int  # document i is held out when i % every == every // 2
    tokenize_batch: int

    def documents(self) -> Iterator[str]:
        """The non-empty documents of every source, in order."""
        import datasets

        for source in self.sources:
            if "hub" in source:
                where, field = source["hub"], self.text_field
                stream = datasets.load_dataset(where, split="train", streaming=True)
            else:
                where, suffixes = source["path"], [s for s in Path(source["path"]).suffixes if s != ".gz"]
                builder = BUILDERS.get(suffixes[-1] if suffixes else ".txt", "text")
                field = "text" if builder == "text" else self.text_field
                extra = {"sample_by": "document"} if builder == "text" else {}
                stream = datasets.load_dataset(builder, data_files=where, split="train", streaming=True, **extra)
            # .iter, not iteration: inside a DataLoader worker, iterating would deal whole files out to workers
            batches = stream.iter(batch_size=256)
            records = (dict(zip(b, r, strict=True)) for b in batches for r in zip(*b.values(), strict=True))
            for number, record in enumerate(records, 1):
                text = record.get(field)
                if text is None:  # a field missing from some records streams as None
                    keys = sorted(k for k, v in record.items() if v is not None)
                    raise ValueError(f"{where}: record {number} has no {field!r} field (set text_field); keys: {keys}")
                if str(text).strip():
                    yield str(text)

    def chosen(self, validation: bool, reader: int = 0, readers: int = 1) -> Iterator[str]:
        """The held-out documents, or the share of the training documents of reader ``reader`` of ``readers``."""
        trained = 0
        for i, text in enumerate(self.documents()):
            if i % self.every == self.every // 2:
                if validation:
                    yield text
            elif not validation:
                if trained % readers == reader:
                    yield text
                trained += 1

    def packed(self, documents: Iterator[str]) -> Iterator[torch.Tensor]:
        """Rows of ``seq_len`` token ids of ``documents``, each followed by EOS; the last partial row is dropped."""
        eos, carry = self.tokenizer.eos_token_id, []
        while batch := list(itertools.islice(documents, self.tokenize_batch)):
            for ids in self.tokenizer(batch, add_special_tokens=False)["input_ids"]:
                carry += ids
                carry.append(eos)
            full = len(carry) - len(carry) % self.seq_len
            for start in range(0, full, self.seq_len):
                yield torch.tensor(carry[start : start + self.seq_len], dtype=torch.long)
            del carry[:full]


class ReaderRows(IterableDataset):
    """One epoch of a process's training rows, each DataLoader worker one reader (see the module docstring), as
    ``{"input_ids": row, "reader": r}`` items: :class:`EqualBatches` checks ``reader`` and drops it."""

    def __init__(self, stream: DocumentStream, rank: int, world: int, epoch: int, seed: int, buffer: int,
                 batch_size: int, done: int) -> None:  # fmt: skip
        self.stream, self.rank, self.world, self.epoch, self.seed = stream, rank, world, epoch, seed
        self.buffer, self.batch_size, self.done = buffer, batch_size, done

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # The DataLoader asks worker 0 first; after `done` batches the next batch is reader done % workers's.
        reader = (worker + self.done) % workers
        slot = self.rank * workers + reader
        skip = max(0, math.ceil((self.done - reader) / workers)) * self.batch_size
        rng = np.random.default_rng([self.seed, self.epoch, slot])
        rows = self.stream.packed(self.stream.chosen(False, slot, self.world * workers))
        for row in itertools.islice(shuffled(rows, self.buffer, rng), skip, None):
            yield {"input_ids": row, "reader": reader}


class ValidationRows(IterableDataset):
    """The first ``rows`` rows of the held-out documents, in order (read by one worker at most)."""

    def __init__(self, stream: DocumentStream, rows: int) -> None:
        self.stream, self.rows = stream, rows

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for row in itertools.islice(self.stream.packed(self.stream.chosen(True)), self.rows):
            yield {"input_ids": row}


class EqualBatches:
    """The training loader Lightning iterates: the DataLoader's batches while every reader of every process has one.

    Each ``iter`` starts the trainer's current epoch (after a resume, from the batch it had reached).
    """

    def __init__(self, data: StreamingTextDataModule) -> None:
        self.data = data

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        data, t = self.data, self.data.trainer
        rank, world, epoch = (0, 1, 0) if t is None else (t.global_rank, t.world_size, t.current_epoch)
        # Batches of this epoch the trainer has finished: 0 when an epoch starts, the checkpoint's after a resume.
        done = 0 if t is None else t.fit_loop.epoch_loop.batch_progress.current.ready
        rows = ReaderRows(data.stream, rank, world, epoch, data.seed, data.shuffle_buffer, data.batch_size, done)
        loader = DataLoader(rows, data.batch_size, drop_last=True, num_workers=data.num_workers)
        return self._batches(loader, done, max(1, data.num_workers), t.strategy if world > 1 else None)

    @staticmethod
    def _batches(loader: DataLoader, done: int, workers: int, strategy: Any) -> Iterator[dict[str, torch.Tensor]]:
        batches = iter(loader)  # workers start on the first batch asked for (Lightning may call iter twice)
        for i in itertools.count(done):
            batch = next(batches, None)
            # A batch from another worker than the round-robin's: a worker of this process has run out.
            if batch is not None and int(batch.pop("reader")[0]) != i % workers:
                batch = None
            missing = batch is None
            if strategy is not None:  # True on every process when any one is out
                missing = strategy.reduce_boolean_decision(missing, all=False)
            if missing:
                return
            yield batch


class StreamingTextDataModule(TokenizerProperties, pl.LightningDataModule):
    """Packed fixed-length token sequences streamed from files or the Hub, tokenized on the fly, resumable.

    Batches are ``{"input_ids": LongTensor[batch_size, seq_len]}``, not shifted (the modules shift). See the module
    docstring for how the stream is split, shuffled and shared over processes and workers, and what it costs.

    Args:
        files: ``.jsonl``/``.parquet``/``.txt`` files (``.gz`` for jsonl and txt; any other name is read as one
            text document), or one Hugging Face dataset name (its ``train`` split) that is not a local path.
        tokenizer: a Hugging Face tokenizer name or local directory (required: a stream cannot train one).
        seq_len: tokens per sequence.
        batch_size: sequences per batch.
        num_workers: DataLoader workers per process; each reads the whole stream and packs its share of it.
        text_field: the text field of the records (``.txt`` files are read whole as one document each).
        val_fraction: the share of documents held out for validation, in (0, 1).
        val_rows: the most rows validation reads (from the start of the held-out documents, each time; every
            process reads the same rows).
        shuffle_buffer: rows each reader shuffles through (the memory the shuffle takes).
        seed: the shuffle's seed (with the epoch and the reader); saved in checkpoints.
        tokenize_batch: documents per tokenizer call.

    Raises:
        ValueError: no files, no tokenizer, a setting out of range; when the stream reaches it, a record without
            ``text_field``. FileNotFoundError: a missing file.

    Example:
        >>> data = StreamingTextDataModule(["web.jsonl.gz"], tokenizer="gpt2", seq_len=1024)
        >>> trainer.fit(module, datamodule=data)   # resumable mid-epoch with fit(..., ckpt_path=...)
    """

    def __init__(
        self,
        files: list[str],
        tokenizer: str | None = None,
        seq_len: int = 128,
        batch_size: int = 16,
        num_workers: int = 0,
        text_field: str = "text",
        val_fraction: float = 0.05,
        val_rows: int = 256,
        shuffle_buffer: int = 1024,
        seed: int = 0,
        tokenize_batch: int = 256,
    ) -> None:
        super().__init__()
        if not tokenizer:
            raise ValueError(
                "StreamingTextDataModule needs tokenizer=: a Hugging Face tokenizer name or a directory a tokenizer"
                " was saved to (a streamed corpus is never read whole, so no tokenizer is trained on it)"
            )
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
        if min(seq_len - 1, batch_size, shuffle_buffer, tokenize_batch) < 1 or min(num_workers, val_rows, seed) < 0:
            raise ValueError(
                f"need seq_len >= 2, batch_size, shuffle_buffer, tokenize_batch >= 1, num_workers, val_rows, seed >= 0;"
                f" got {seq_len}, {batch_size}, {shuffle_buffer}, {tokenize_batch}, {num_workers}, {val_rows}, {seed}"
            )
        self.sources = stream_sources(files)
        self.tokenizer_name, self.tokenizer = tokenizer, load_tokenizer(tokenizer)
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.val_rows, self.shuffle_buffer, self.seed = val_rows, shuffle_buffer, seed
        every = max(2, round(1 / val_fraction))  # at least 2: training keeps every other document
        self.stream = DocumentStream(self.sources, text_field, self.tokenizer, seq_len, every, tokenize_batch)

    def train_dataloader(self) -> EqualBatches:
        return EqualBatches(self)  # re-iterable: each epoch's DataLoader is made when Lightning starts the epoch

    def val_dataloader(self) -> DataLoader:
        rows = ValidationRows(self.stream, self.val_rows)  # one worker at most: each would read the same rows
        return DataLoader(rows, self.batch_size, num_workers=min(1, self.num_workers))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "source": self.sources, "seq_len": self.seq_len, "tokenizer": self.tokenizer_name}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        theirs = (state_dict.get("source"), state_dict.get("seq_len"))
        if theirs != (self.sources, self.seq_len):
            raise ValueError(
                f"resuming a streamed run with other data: the checkpoint read {theirs[0]} in rows of {theirs[1]}"
                f" tokens, this run reads {self.sources} in rows of {self.seq_len}; resume with the same files"
                " (unchanged) and seq_len, or start a new run without ckpt_path"
            )
        self.seed = state_dict["seed"]
