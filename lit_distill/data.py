"""Text for distillation: the bundled corpus or local files, a tokenizer, fixed-length packed sequences.

The bundled corpus is the 42 plays and poems of Shakespeare (Project Gutenberg texts as shipped in the
``shakespeare`` 0.6 package; credit: Open Knowledge Foundation, shakespeare package 0.6, CC BY 2.5), so
that nothing is downloaded. Validation holds out whole documents (whole works for the bundled corpus), so
no validation text is ever seen in training.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

BUNDLED_CORPUS = Path(__file__).parent / "assets" / "shakespeare.txt.gz"
CORPUS_CREDIT = "Open Knowledge Foundation, shakespeare package 0.6 (CC BY 2.5); Project Gutenberg texts"
EOS, PAD = "<|endoftext|>", "<|pad|>"


def default_cache_dir() -> Path:
    """``$LIT_DISTILL_CACHE``, else ``$XDG_CACHE_HOME/lit-distill``, else ``~/.cache/lit-distill``."""
    if os.environ.get("LIT_DISTILL_CACHE"):
        return Path(os.environ["LIT_DISTILL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lit-distill"


def writable_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and check that it is writable (a clear error instead of a late one)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(
            f"cache directory {path} is not writable ({err.strerror}); pass another one (cache_dir=... or"
            " --cache-dir) or set LIT_DISTILL_CACHE"
        ) from err
    return path


# ------------------------------------------------------------------ documents
def read_documents(files: Sequence[str] | None = None, text_field: str = "text") -> list[str]:
    """Documents from ``files`` (``.txt``: one document per file; ``.jsonl``: one per line, ``text_field``;
    ``.parquet``: one per row, via ``datasets``; ``.gz`` variants of txt/jsonl), or the bundled works."""
    if not files:
        return split_works(_read_text(BUNDLED_CORPUS))
    documents = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        suffixes = [s for s in path.suffixes if s != ".gz"]
        kind = suffixes[-1] if suffixes else ".txt"
        if kind == ".jsonl":
            documents += _jsonl_documents(path, text_field)
        elif kind == ".parquet":
            documents += _parquet_documents(path, text_field)
        else:
            documents.append(_read_text(path))
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise ValueError(f"the corpus {', '.join(map(str, files))} holds no text")
    return documents


def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def _jsonl_documents(path: Path, field: str) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    documents = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if field not in record:
                raise ValueError(f"{path}:{number} has no {field!r} field (set text_field); keys: {sorted(record)}")
            documents.append(str(record[field]))
    return documents


def _parquet_documents(path: Path, field: str) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"reading {path} needs the datasets package: pip install datasets") from err
    table = datasets.Dataset.from_parquet(str(path))
    if field not in table.column_names:
        raise ValueError(f"{path} has no {field!r} column (set text_field); columns: {table.column_names}")
    return [str(x) for x in table[field]]


def split_works(text: str) -> list[str]:
    """Split the bundled corpus into its works.

    Each work starts with a title line and, after blank lines, its byline. The file glues a title to the
    previous work's last words ("THE ENDANTONY AND CLEOPATRA", "[Exeunt.]AS YOU LIKE IT"), so the cut
    falls after such an ending; every character lands in exactly one work either way.
    """
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    cuts = []
    for i, line in enumerate(lines):
        if line.startswith("by William Shakespeare"):
            title = i - 1
            while title > 0 and not lines[title].strip():
                title -= 1
            head = lines[title]
            within = 7 if head.startswith("THE END") else head.rfind("]") + 1
            cuts.append(offsets[title] + within)
    cuts = [0, *[c for c in cuts if c > 0], len(text)]
    return [text[a:b] for a, b in itertools.pairwise(cuts) if text[a:b].strip()]


def split_documents(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation): every k-th whole document goes to validation (at least one).

    A single document is cut once, at a line break near the end, so the two parts still share no text.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if len(documents) == 1:
        text = documents[0]
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
        cut = cut if cut > 0 else int(len(text) * (1 - val_fraction))
        return [text[:cut]], [text[cut:]]
    n_val = max(1, round(len(documents) * val_fraction))
    step = len(documents) / n_val
    val_idx = {int(step * i + step / 2) for i in range(n_val)}
    train = [d for i, d in enumerate(documents) if i not in val_idx]
    val = [d for i, d in enumerate(documents) if i in val_idx]
    return train, val


# ------------------------------------------------------------------ tokenizer
def load_tokenizer(name_or_path: str):
    """A Hugging Face tokenizer by Hub name or local directory, with an error that says what to do offline.

    Raises:
        FileNotFoundError: for a local path (see :func:`~lit_distill.models.missing_local_path`) that does not
            exist; the Hub is not asked then.
        OSError: when neither a local directory nor the Hub (or its cache) has it.
    """
    from transformers import AutoTokenizer

    from .models import missing_local_path

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


class _Blocks(Dataset):
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


class TextDataModule(pl.LightningDataModule):
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
        self.sampler: EpochShuffle | None = None
        self._resumed_seed: int | None = None

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
            self.train_blocks = pack(self.train_documents, self.tokenizer, self.seq_len, "training")
            if self.max_train_tokens is not None:
                self.train_blocks = self.train_blocks[: max(1, self.max_train_tokens // self.seq_len)]
            self.val_blocks = pack(self.val_documents, self.tokenizer, self.seq_len, "validation")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        blocks = _Blocks(self.train_blocks)
        if self.trainer is not None and self.trainer.world_size > 1:
            # Lightning swaps in a DistributedSampler (one order per epoch); a resume restarts the epoch.
            return DataLoader(blocks, self.batch_size, shuffle=True, drop_last=True, num_workers=self.num_workers)
        self.sampler = EpochShuffle(len(blocks), self.batch_size, self._batches_done)
        if self._resumed_seed is not None:
            self.sampler.seed, self.sampler.resuming = self._resumed_seed, True
            self._resumed_seed = None
        return DataLoader(blocks, self.batch_size, sampler=self.sampler, drop_last=True, num_workers=self.num_workers)

    def _batches_done(self) -> int:
        """Batches of the current epoch the trainer has finished (restored from a checkpoint on resume)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self.trainer is not None else 0

    def state_dict(self) -> dict[str, Any]:
        return {"shuffle_seed": self.sampler.seed} if self.sampler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_seed = state_dict.get("shuffle_seed")

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(_Blocks(self.val_blocks), batch_size=self.batch_size, num_workers=self.num_workers)

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
