"""Chat data tokenized once into a prepared directory, read back memory-mapped and checked
(``prepare_chat``, ``ChatDataModule(prepared=...)``).

A prepared chat directory::

    train/          the training rows, as ``Dataset.save_to_disk`` writes them (Arrow: memory-mapped on load)
    val/            the held-out rows, when there are any
    tokenizer/      the tokenizer the ids belong to (with the chat template the rows were rendered with)
    prepared.json   what was prepared and how: the tokenizer's hash, the chat template's sha256, max_seq_length,
                    loss_on, truncation, the special token ids, the counts, the sources and a sha256 per Arrow
                    file (written last: the directory is whole when it is there)

The rows are exactly those ``ChatDataModule`` trains on (its own ``_prepare``: template, ``loss_on``, cut and
drops), one conversation per row: packing happens when they are read, so one directory serves packed and padded
training. The directory is written under a temporary name and renamed when complete: an interrupted run leaves
nothing that reads as whole.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .cache_dir import sha256_file
from .chat_template import resolve_template
from .prepared import META, SPLITS, TOKENIZER_DIR, whole_directory
from .tokenizers import special_token_ids, tokenizer_hash

KIND = "chat"
FORMAT_VERSION = 1
#: the module settings that decide the rows, checked against the stored ones on open (the template apart)
SETTINGS = ("max_seq_length", "loss_on", "truncation")


def prepare_chat(data, directory: str | os.PathLike) -> dict[str, Any]:
    """Tokenize ``data`` (a :class:`~lit_distill.data.ChatDataModule`) once into ``directory``; returns what
    ``prepared.json`` holds. ``datasets`` shows its progress bars (tokenizing, saving).

    Raises:
        FileExistsError: ``directory`` exists (delete it, or read it with ``ChatDataModule(prepared=...)``).
        ValueError, FileNotFoundError, OSError: whatever preparing the module raises; nothing is left behind.

    Example:
        >>> prepare_chat(ChatDataModule("chats.jsonl", tokenizer="artifacts/teacher"), "prepared/chats")
    """
    directory = Path(directory)
    if directory.exists():  # before any work
        raise FileExistsError(f"{directory} exists: prepare into a new directory, or delete it first")
    template = template_in_use(data.tokenizer, data.chat_template)
    train, val, summary = data._prepare()
    with whole_directory(directory) as tmp:
        for split, rows in zip(SPLITS, (train, val), strict=True):
            if rows is not None:
                rows.save_to_disk(str(tmp / split))
        tokenizer = data.tokenizer
        if data.chat_template is not None and template is not None:
            tokenizer = copy.deepcopy(tokenizer)  # the override travels with the tokenizer: a reader needs no file
            tokenizer.chat_template = template
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        meta = {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "tokenizer_hash": tokenizer_hash(data.tokenizer),
            "chat_template_sha256": _sha256_text(template),
            **{name: getattr(data, name) for name in SETTINGS},
            "special_token_ids": special_token_ids(data.tokenizer),
            "summary": summary,
            "sources": _sources(data),
            "sha256": {
                path.relative_to(tmp).as_posix(): sha256_file(path)
                for split in SPLITS
                for path in sorted((tmp / split).glob("*.arrow"))
            },
        }
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return meta


def read_prepared_chat(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``prepared.json`` of ``directory``, of the kind and version this code reads.

    Raises:
        FileNotFoundError: no ``prepared.json``. ValueError: a damaged one, another kind or format version.
    """
    path = Path(directory) / META
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a prepared chat directory: it has no {META}. Make one with lit_distill.data"
            f".prepared_chat.prepare_chat(ChatDataModule(train=..., tokenizer=...), {str(directory)!r})"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"prepared chat directory {directory}: {META} is damaged ({err}); prepare it again") from err
    found = (meta.get("kind"), meta.get("format_version")) if isinstance(meta, dict) else (None, None)
    if found != (KIND, FORMAT_VERSION):
        raise ValueError(
            f"{directory} holds kind={found[0]!r}, format_version={found[1]!r}; ChatDataModule reads kind={KIND!r},"
            f" format_version={FORMAT_VERSION}: prepare it again with prepare_chat"
        )
    return meta


def check_prepared_chat(meta: dict[str, Any], data, directory: str | os.PathLike) -> None:
    """Raise when ``data``'s tokenizer or settings (a ``ChatDataModule``'s) are not those ``meta`` was made with.

    Raises:
        ValueError: naming both values (hashes by their first 12 characters).
    """
    ours = tokenizer_hash(data.tokenizer)
    if ours != meta["tokenizer_hash"]:
        raise ValueError(
            f"prepared chat directory {directory} was tokenized by another tokenizer (its tokenizer_hash"
            f" {meta['tokenizer_hash'][:12]}, this module's {ours[:12]}): its ids would mean other tokens. Leave"
            " tokenizer unset to use the one saved with it, or prepare it again with this tokenizer"
        )
    for name in SETTINGS:
        if getattr(data, name) != meta[name]:
            raise ValueError(
                f"prepared chat directory {directory} was prepared with {name}={meta[name]!r}, this module has"
                f" {name}={getattr(data, name)!r}: set {name}={meta[name]!r}, or prepare it again"
            )
    template = _sha256_text(template_in_use(data.tokenizer, data.chat_template))
    if template != meta["chat_template_sha256"]:
        short = [value[:12] if value else None for value in (meta["chat_template_sha256"], template)]
        raise ValueError(
            f"prepared chat directory {directory} was rendered with another chat template (its sha256 {short[0]},"
            f" this module's {short[1]}): leave chat_template unset to use the one saved with it, or prepare it again"
        )


def load_prepared_chat(directory: str | os.PathLike, meta: dict[str, Any]):
    """(train rows, val rows or None, counts per split) of a prepared directory, memory-mapped, once every Arrow
    file's sha256 is checked against ``meta``.

    Raises:
        ValueError: an Arrow file missing, or other than the one prepared (truncated or corrupt).
    """
    import datasets

    directory = Path(directory)
    for name, digest in meta["sha256"].items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            problem = "is missing" if not path.is_file() else f"differs from its sha256 in {META}"
            raise ValueError(
                f"prepared chat directory {directory} is truncated or corrupt: {name} {problem}; prepare it again"
            )
    rows = {
        split: datasets.load_from_disk(str(directory / split)).with_format("numpy", columns=["input_ids", "labels"])
        for split in SPLITS
        if (directory / split).is_dir()
    }
    return rows["train"], rows.get("val"), copy.deepcopy(meta["summary"])  # a copy: packing adds its count


def template_in_use(tokenizer, chat_template: str | None) -> str | None:
    """The chat template the module renders with; None when there is none (only ``text`` data reads then)."""
    try:
        return resolve_template(tokenizer, chat_template)
    except ValueError:
        return None


def _sha256_text(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def _sources(data) -> list[dict[str, Any]]:
    """Each source of ``data``: a local file or directory by its path and size in bytes, a Hub dataset by name."""
    found = []
    for role, source in (("train", data.train), ("val", data.val)):
        if source is None:
            continue
        path = Path(source).expanduser()
        if path.is_file():
            found.append({"role": role, "path": str(path.resolve()), "bytes": path.stat().st_size})
        elif path.is_dir():
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            found.append({"role": role, "path": str(path.resolve()), "bytes": size})
        else:
            found.append({"role": role, "name": source, "split": data.split if role == "train" else data.val_split})
    return found
