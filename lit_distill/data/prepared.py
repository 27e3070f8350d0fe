"""A text corpus tokenized once into a prepared directory, read a row at a time (``lit-distill prepare``).

A prepared directory::

    prepared.json   what was prepared and how: the tokenizer's hash and special token ids, seq_len, the sources
                    and their sizes, documents, tokens and rows per split, a sha256 per token file, the format
                    version (written last: the directory is whole when it is there)
    train.bin       the training documents' token ids, each document followed by EOS, one after another
    val.bin         the same for the held-out documents
    tokenizer/      the tokenizer the ids belong to

The token files are flat little-endian arrays (uint16 when every id fits, else uint32), as nanoGPT's: row ``i`` of
``seq_len`` tokens is the slice ``[i * seq_len, (i + 1) * seq_len)``, read on its own (``prepared_rows.py``) without
reading the rest, so a training process's memory does not grow with the corpus. Two bytes a token, where the
``datasets`` Arrow form of the same ids (a list of int64 per row) takes eight, and a row is a slice, not a record.
The rows are exactly those ``TextDataModule`` packs in memory (the same documents, split the same way, the same EOS
after each).

The documents are read through ``datasets`` (jsonl and parquet into memory-mapped Arrow files) and tokenized a
thousand at a time, by ``num_proc`` worker processes when asked, written in order as they come: preparing holds a
few batches of documents at a time. The directory is written under a temporary name and renamed when complete:
an interrupted run leaves no directory that reads as whole, and a rerun starts clean.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .cache_dir import sha256_file
from .corpus import document_splits
from .tokenizers import special_token_ids, tokenizer_hash

FORMAT_VERSION = 1
META = "prepared.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class PreparedText:
    """The contents of ``prepared.json``."""

    tokenizer_hash: str
    vocab_size: int
    eos_token_id: int
    seq_len: int
    val_fraction: float
    text_field: str
    sources: list[dict[str, Any]]  # {"path", "bytes"} per source file ("bundled" for the bundled corpus)
    dtype: str  # "uint16" or "uint32"
    documents: dict[str, int] = field(default_factory=dict)  # per split
    tokens: dict[str, int] = field(default_factory=dict)  # per split, EOS included
    sha256: dict[str, str] = field(default_factory=dict)  # per token file
    format_version: int = FORMAT_VERSION
    kind: str = "text"  # a prepared chat directory says "chat" (prepared_chat.py)
    special_token_ids: dict[str, int] = field(default_factory=dict)  # bos/eos/pad, those the tokenizer has
    row_counts: dict[str, int] = field(default_factory=dict)  # rows of seq_len per split, for people reading it

    def rows(self, split: str) -> int:
        return self.tokens[split] // self.seq_len

    @property
    def fingerprint(self) -> str:
        """What the rows are, in 32 hex digits: the hash of this metadata (the token files' sha256 included)."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]

    def write(self, directory: Path) -> None:
        (Path(directory) / META).write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")

    @classmethod
    def read(cls, directory: str | Path) -> PreparedText:
        path = Path(directory) / META
        if not path.exists():
            raise FileNotFoundError(
                f"{directory} is not a prepared corpus: it has no {META} (prepare one with `lit-distill prepare`)"
            )
        try:
            raw = json.loads(path.read_text())
            if raw.get("kind", "text") != "text":
                raise ValueError(
                    f"{directory} holds prepared {raw['kind']} data, not text: read it with"
                    " ChatDataModule(prepared=...)"
                )
            if raw.get("format_version") != FORMAT_VERSION:
                raise ValueError(
                    f"prepared corpus {directory}: format_version is {raw.get('format_version')}, this lit-distill"
                    f" reads {FORMAT_VERSION}; prepare it again"
                )
            return cls(**raw)
        except (TypeError, json.JSONDecodeError) as err:
            raise ValueError(f"prepared corpus {directory}: {META} is damaged ({err!r}); prepare it again") from err


def open_prepared(directory: str | Path, tokenizer=None, seq_len: int | None = None, verify: bool = True):
    """The ``prepared.json`` of ``directory``, checked: against ``tokenizer`` and ``seq_len`` when given, and the
    token files' sizes (and, with ``verify``, their sha256).

    Raises:
        FileNotFoundError, ValueError: no or a damaged ``prepared.json``, another tokenizer or ``seq_len`` (the
            message names both), a missing, truncated or corrupt token file.
    """
    meta = PreparedText.read(directory)
    if seq_len is not None and seq_len != meta.seq_len:
        raise ValueError(
            f"prepared corpus {directory} holds rows of seq_len={meta.seq_len}, this run reads seq_len={seq_len}:"
            f" prepare it again with seq_len {seq_len}, or set seq_len {meta.seq_len}"
        )
    if tokenizer is not None and tokenizer_hash(tokenizer) != meta.tokenizer_hash:
        raise ValueError(
            f"prepared corpus {directory} was tokenized by another tokenizer (its tokenizer_hash"
            f" {meta.tokenizer_hash[:12]}, this run's {tokenizer_hash(tokenizer)[:12]}): its ids would mean other"
            " tokens; prepare it again with this tokenizer"
        )
    for split in SPLITS:
        path = token_file(directory, split)
        if not path.exists():
            raise FileNotFoundError(f"prepared corpus {directory}: {path.name} is missing; prepare it again")
        expected = meta.tokens[split] * np.dtype(meta.dtype).itemsize
        if path.stat().st_size != expected or (verify and sha256_file(path) != meta.sha256[split]):
            raise ValueError(
                f"prepared corpus {directory}: {path.name} is truncated or corrupt (its size or sha256 differs from"
                f" {META}'s); prepare it again"
            )
    return meta


def check_num_proc(num_proc: int | None) -> None:
    """Raise when ``num_proc`` (processes that tokenize) is not between 1 and this machine's CPUs."""
    cpus = os.cpu_count() or 1
    if num_proc is not None and not 1 <= num_proc <= cpus:
        raise ValueError(f"num_proc must lie in [1, {cpus}] (this machine's CPUs), got {num_proc}")


def token_file(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"{split}.bin"


def prepare_text(
    files: list[str] | None,
    tokenizer,
    directory: str | Path,
    *,
    seq_len: int,
    val_fraction: float = 0.05,
    text_field: str = "text",
    num_proc: int | None = None,
) -> PreparedText:
    """Tokenize ``files`` (as :class:`~lit_distill.data.TextDataModule` reads them; None: the bundled corpus) with
    ``tokenizer`` into ``directory``; returns what ``prepared.json`` holds.

    Raises:
        FileExistsError: ``directory`` exists (delete it, or read it).
        FileNotFoundError, ValueError: a missing file, no text, a split shorter than one row of ``seq_len``,
            ``num_proc`` larger than this machine's CPUs.
    """
    from tqdm.auto import tqdm

    directory = Path(directory)
    if directory.exists():  # before any work
        raise FileExistsError(f"{directory} exists: prepare into a new directory, or delete it first")
    if seq_len < 2:
        raise ValueError(f"need seq_len >= 2, got {seq_len}")
    check_num_proc(num_proc)
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token, which ends every document")
    splits, sources = document_splits(files, text_field, val_fraction)
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    with whole_directory(directory) as tmp:
        documents, tokens, digests = {}, {}, {}
        for split, dataset in splits.items():
            documents[split] = len(dataset)
            batches, path = _encoded_batches(dataset, tokenizer, dtype, num_proc), token_file(tmp, split)
            with tqdm(total=len(dataset), desc=f"tokenizing the {split} split", unit=" documents") as bar:
                tokens[split], digests[split] = _write_tokens(batches, path, bar, np.dtype(dtype).itemsize)
            if tokens[split] < seq_len:
                raise ValueError(
                    f"the {'training' if split == 'train' else 'validation'} text has {tokens[split]} tokens, fewer"
                    f" than one sequence of seq_len={seq_len}; use more text or a shorter seq_len"
                )
        meta = PreparedText(
            tokenizer_hash=tokenizer_hash(tokenizer), vocab_size=len(tokenizer), eos_token_id=eos, seq_len=seq_len,
            val_fraction=val_fraction, text_field=text_field, sources=sources, dtype=np.dtype(dtype).name,
            documents=documents, tokens=tokens, sha256=digests, special_token_ids=special_token_ids(tokenizer),
            row_counts={split: n // seq_len for split, n in tokens.items()},
        )  # fmt: skip
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        meta.write(tmp)
    return meta


@contextlib.contextmanager
def whole_directory(directory: str | Path):
    """A temporary sibling of ``directory`` to write into, renamed to ``directory`` when the block ends without
    an error (and removed when it raises): the directory is whole, or not there. When another process prepared
    the same inputs first (two ranks of one run), its directory is kept."""
    directory = Path(directory)
    if directory.exists():
        raise FileExistsError(f"{directory} exists: prepare into a new directory, or delete it first")
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an earlier run of this pid
    tmp.mkdir(parents=True)
    try:
        yield tmp
        try:
            os.replace(tmp, directory)
        except OSError:
            if not (directory / META).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_TOKENIZER = None  # the tokenizer of a worker process


def _set_tokenizer(tokenizer) -> None:
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _encode(texts: list[str], tokenizer=None, dtype=np.uint16) -> tuple[int, bytes]:
    """(documents, their token ids each followed by EOS, as ``dtype`` bytes)."""
    tokenizer = tokenizer or _TOKENIZER
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    ids = np.fromiter((t for doc in encoded for t in (*doc, eos)), dtype=dtype, count=sum(len(d) + 1 for d in encoded))
    return len(texts), ids.tobytes()


def _encoded_batches(dataset, tokenizer, dtype, num_proc: int | None, batch_size: int = 1000):
    """``_encode`` of every batch of ``dataset``'s documents, in order: in this process, or in ``num_proc``
    forked workers (the fast tokenizer's own threads serve one process; workers serve several)."""
    texts = (batch["text"] for batch in dataset.iter(batch_size=batch_size))
    if not num_proc or num_proc == 1:
        yield from (_encode(t, tokenizer, dtype) for t in texts)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(num_proc, initializer=_set_tokenizer, initargs=(tokenizer,)) as pool:
        yield from pool.imap(functools.partial(_encode, dtype=dtype), texts)


def _write_tokens(batches, path: Path, bar, itemsize: int) -> tuple[int, str]:
    """Write the encoded batches to ``path`` one after another; (tokens written, sha256 of the file)."""
    digest, total = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for documents, data in batches:
            f.write(data)
            digest.update(data)
            total += len(data)
            bar.update(documents)
    return total // itemsize, digest.hexdigest()
