"""Tokenizers: a byte-level BPE trained on the corpus, or a Hugging Face one by name or directory.

Also their special tokens, and the check that the data's tokenizer is the one saved with the teacher.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .cache_dir import writable_dir

EOS, PAD = "<|endoftext|>", "<|pad|>"


def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer by Hub name or local directory, with an error that says what to do offline.

    Raises:
        FileNotFoundError: for a local path (see :func:`~lit_distill.models.missing_local_path`) that does not
            exist; the Hub is not asked then.
        OSError: when neither a local directory nor the Hub (or its cache) has it.
    """
    from transformers import AutoTokenizer

    from ..models import missing_local_path

    missing = missing_local_path(name_or_path)
    if missing is not None:
        raise FileNotFoundError(
            f"could not find the tokenizer {name_or_path!r}: {missing}. Point tokenizer= at a directory with"
            " tokenizer.json (tokenizer.save_pretrained writes one), or leave it unset to train a byte-level BPE"
            " on the corpus"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as err:
        raise OSError(
            f"could not find the tokenizer {name_or_path!r} (looked for a local directory of that name, then"
            " the Hugging Face Hub or its cache; offline, only local copies work). Point tokenizer= at a"
            " directory with tokenizer.json (tokenizer.save_pretrained writes one), or leave it unset to"
            " train a byte-level BPE on the corpus"
        ) from err
    if tokenizer.eos_token is None:
        tokenizer.add_special_tokens({"eos_token": EOS})
    return tokenizer


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token to id), the same for equal vocabularies."""
    vocabulary = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocabulary).encode()).hexdigest()


class TokenizerProperties:
    """What a data module with a ``tokenizer`` tells the models built for it (the command line links both into
    the model's config): the token ids they must cover, and the special tokens' ids."""

    tokenizer: Any

    @property
    def vocab_size(self) -> int:
        """Token ids the models must cover (the tokenizer's size, special tokens included)."""
        return len(self.tokenizer)

    @property
    def special_tokens(self) -> dict[str, int]:
        """The tokenizer's ``bos_token_id``, ``eos_token_id`` and ``pad_token_id`` (those it has), for the
        configs of models built for it (the command line links them to ``model.init_args.special_tokens``)."""
        return special_token_ids(self.tokenizer)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")


def saved_tokenizer_dir(name_or_path: str | os.PathLike | None) -> Path | None:
    """``name_or_path`` as a directory when it is a local one holding a saved tokenizer, else None."""
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    if path.is_dir() and any((path / name).is_file() for name in TOKENIZER_FILES):
        return path
    return None


def special_token_ids(tokenizer) -> dict[str, int]:
    """The tokenizer's ``bos_token_id``, ``eos_token_id`` and ``pad_token_id``, those it has, for model configs."""
    ids = {name: getattr(tokenizer, name, None) for name in SPECIAL_TOKENS}
    return {name: int(value) for name, value in ids.items() if isinstance(value, int)}


def check_tokenizer(teacher, tokenizer) -> None:
    """Raise when ``tokenizer`` (the data's) is not the tokenizer saved with ``teacher``.

    The teacher's source is ``teacher.name_or_path`` (or ``teacher.config._name_or_path``), which
    ``from_pretrained`` sets to the directory or Hub name it loaded from. When that is a local directory with a
    saved tokenizer, every token of that tokenizer must have the same id in ``tokenizer``; ``tokenizer`` may
    add tokens after the teacher's last id (special tokens added on load; the models' vocabulary sizes are
    checked separately). A teacher without a saved tokenizer (a random one, a Hub model) passes.

    Args:
        teacher: a built Hugging Face model (anything else passes).
        tokenizer: a Hugging Face tokenizer.

    Raises:
        ValueError: naming both tokenizers, how many ids they share, and the setting that fixes it.
    """
    source = getattr(teacher, "name_or_path", None) or getattr(getattr(teacher, "config", None), "_name_or_path", None)
    directory = saved_tokenizer_dir(source) if isinstance(source, (str, os.PathLike)) else None
    if directory is None or not hasattr(tokenizer, "get_vocab"):
        return
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(directory).get_vocab()
    ours = tokenizer.get_vocab()
    if ours == theirs:
        return
    last = max(theirs.values(), default=-1)
    differ = sum(1 for token, index in theirs.items() if ours.get(token) != index)
    differ += sum(1 for token, index in ours.items() if index <= last and theirs.get(token) != index)
    if differ == 0:
        return
    same = sum(1 for token, index in theirs.items() if ours.get(token) == index)
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    raise ValueError(
        f"the data's tokenizer ({name}, {len(ours)} tokens) is not the teacher's ({directory}, {len(theirs)}"
        f" tokens): only {same} of the teacher's {len(theirs)} token ids stand for the same token in both, so the"
        f" teacher's distributions would be read against the wrong tokens. Use the teacher's tokenizer: set"
        f" data.tokenizer to {str(directory)!r} (TextDataModule(tokenizer=...)); on the command line, leaving"
        " data.tokenizer unset uses it"
    )


def train_bpe(documents: list[str], vocab_size: int, cache_dir: str | Path):
    """A byte-level BPE of ``vocab_size`` tokens trained on ``documents``, cached by content and size."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    digest = hashlib.sha1(f"{vocab_size}".encode())
    for doc in documents:
        digest.update(doc.encode())
    directory = Path(cache_dir) / "tokenizers" / f"bpe-{vocab_size}-{digest.hexdigest()[:12]}"
    if (directory / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(directory)
    writable_dir(directory.parent)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        documents, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS, PAD], show_progress=False
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=PAD, bos_token=EOS)
    tokenizer.save_pretrained(directory)
    return tokenizer
