"""Chat data: conversations in a file, a saved dataset or a Hub dataset, through the tokenizer's chat template,
into right-padded batches whose labels count only the tokens to learn (``ChatDataModule``).

Batches are dicts of ``(B, T)`` tensors:

- ``input_ids``: the rendered conversations, right-padded with the pad id (EOS when the tokenizer has none);
- ``labels``: ``input_ids`` where a token is learned, ``-100`` (ignore_index) elsewhere: system and user turns,
  the template's headers, padding. Labels are NOT shifted: ``labels[:, i]`` is the token at position ``i``; the
  modules shift (position ``i`` predicts ``labels[:, i + 1]``);
- ``attention_mask``: 1 on tokens, 0 on padding;
- ``prompt_mask``: bool, True on the tokens before a row's first learned token (the prompt on-policy
  distillation continues); not in packed batches.

With ``packing=True`` a training row holds several conversations (``packing.py``) and the batch adds
``position_ids`` (``(B, T)``, restarting at 0 at each conversation; padding continues the count); each
conversation's first label is ``-100``, so no position learns to predict the next conversation's first token.

The formats are in ``chat_formats.py``, the rendering and the spans in ``chat_template.py``. ``datasets`` is
imported only where data is read, so ``import lit_distill.data`` works without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .chat_formats import detect_format, normalize
from .chat_template import LOSS_ON, encode, resolve_template
from .mapped import MappedDataModule, _tokenizer_identity
from .packing import PackedRows
from .prepared_chat import TOKENIZER_DIR, check_prepared_chat, load_prepared_chat, read_prepared_chat
from .tokenizers import load_tokenizer, tokenizer_hash

IGNORE_INDEX = -100
TRUNCATION = ("keep_start", "drop")


class PadCollate:
    """Right-pads a list of rows (``input_ids`` and ``labels``, lists or arrays; packed rows add ``position_ids``)
    into the batch dict above."""

    def __init__(self, pad_id: int, ignore_index: int = IGNORE_INDEX) -> None:
        self.pad_id, self.ignore_index = pad_id, ignore_index

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(row["input_ids"]) for row in rows])
        shape = (len(rows), int(lengths.max()))
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, self.ignore_index, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : lengths[i]] = torch.tensor(row["input_ids"])  # a copy: Arrow's arrays are read-only
            labels[i, : lengths[i]] = torch.tensor(row["labels"])
        positions = torch.arange(shape[1])
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": (positions < lengths[:, None]).long()}
        if "position_ids" in rows[0]:  # packed: the padding continues the last conversation's count
            last = torch.tensor([int(row["position_ids"][-1]) for row in rows])
            batch["position_ids"] = (last + 1 - lengths)[:, None] + positions
            for i, row in enumerate(rows):
                batch["position_ids"][i, : lengths[i]] = torch.as_tensor(row["position_ids"])
            return batch
        counted = labels != self.ignore_index
        first = torch.where(counted.any(1), counted.int().argmax(1), lengths)
        return {**batch, "prompt_mask": positions < first[:, None]}


class _Encoder:
    """The ``Dataset.map`` function (batched, with indices): rows of one format to ``input_ids``, ``labels``
    (cut at ``max_seq_length``), ``length`` (before the cut), ``counted`` (learned tokens after position 0, the
    tokens a module can count) and ``merged`` (turn boundaries a BPE merge crossed)."""

    def __init__(self, tokenizer, template: str | None, fmt: str, loss_on: str, max_seq_length: int, where: str):
        self.tokenizer, self.template, self.fmt, self.where = tokenizer, template, fmt, where
        self.loss_on, self.max_seq_length = loss_on, max_seq_length

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "counted": [], "merged": []}
        for k, index in enumerate(indices):
            conversation = normalize({c: v[k] for c, v in batch.items()}, self.fmt, index, self.where)
            ids, counted, merged = encode(self.tokenizer, self.template, conversation, self.loss_on, index, self.where)
            labels = [t if c else IGNORE_INDEX for t, c in zip(ids, counted, strict=True)][: self.max_seq_length]
            out["input_ids"].append(ids[: self.max_seq_length])
            out["labels"].append(labels)
            out["length"].append(len(ids))
            out["counted"].append(sum(label != IGNORE_INDEX for label in labels[1:]))
            out["merged"].append(merged)
        return out


class _PairEncoder:
    """Both sides of a cross-tokenizer row: the student's ``_Encoder`` columns, and the teacher's rendering (its own
    chat template, the same masking rules) as ``teacher_input_ids``, ``teacher_labels`` and ``teacher_length``."""

    def __init__(self, student: _Encoder, teacher: _Encoder) -> None:
        self.student, self.teacher = student, teacher

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out, teacher = self.student(batch, indices), self.teacher(batch, indices)
        return {**out, **{f"teacher_{k}": teacher[k] for k in ("input_ids", "labels", "length")}}


class ChatDataModule(MappedDataModule):
    """Conversations (or prompt/completion pairs, or plain text) as right-padded batches whose labels count only
    what ``loss_on`` names; see docs/data.md.

    Args:
        train: a data file (jsonl/json/parquet/csv/arrow), a ``save_to_disk`` directory, or a Hub name; None with
            ``prepared``.
        val: the same for validation; None holds out ``val_fraction`` of ``train``'s conversations (seeded).
        tokenizer: a Hugging Face tokenizer name or directory (the teacher's); required, but for ``prepared``,
            whose own tokenizer it defaults to.
        chat_template: a Jinja file overriding the tokenizer's chat template.
        max_seq_length: tokens per row at most.
        loss_on: ``"assistant"`` (every assistant turn), ``"last_assistant"``, ``"completion"`` (prompt/completion
            data: everything after the prompt) or ``"all"``. Rows in the ``text`` format count every token.
        truncation: ``"keep_start"`` cuts rows at ``max_seq_length`` (a row left with nothing to learn is
            dropped); ``"drop"`` drops longer rows.
        batch_size: rows per batch. num_workers: DataLoader workers.
        num_proc: processes tokenizing (``Dataset.map``); None tokenizes in this process.
        seed: the seed of the held-out split (the shuffle follows ``seed_everything``, as ``TextDataModule``'s).
        val_fraction: the share of ``train`` held out when ``val`` is None (0: no validation).
        split: the split of ``train`` when it is a Hub dataset or a saved ``DatasetDict``.
        val_split: the same for ``val``.
        cache_dir: where the tokenized rows (and files read by ``datasets``) are cached; default
            :func:`default_cache_dir` for the rows and ``datasets``' own cache for the files.
        packing: pack several training conversations per row (best-fit decreasing, once at setup), with
            ``position_ids``; validation stays one per row. For the off-policy techniques: on-policy distillation
            and ``HardLabelDistillation(mode="generate")`` continue prompts and need packing=False.
        prepared: a directory ``prepare_chat`` wrote (instead of ``train`` and ``val``): its rows are read
            memory-mapped, nothing is tokenized; its split, counts and tokenizer are the prepared ones, and the
            settings above that decide the rows must be those it was prepared with.
        teacher_tokenizer: the teacher's tokenizer (name or directory) when it is not the student's: ``tokenizer``
            is then the student's, each conversation is also rendered with the teacher's chat template (the same
            ``loss_on`` and cut) and the batches gain the teacher's tokens, pairs and chunks
            (:class:`~lit_distill.data.cross_tokenizer.CrossTokenizerCollator`). Not with ``packing`` or
            ``prepared`` (yet).
        teacher_chat_template: a Jinja file overriding the teacher tokenizer's chat template.

    Raises:
        ValueError, FileNotFoundError, ConnectionError: bad options at construction; at setup, data in no known
            format, a bad role, a conversation with nothing to learn, a template without a chat template or
            one that breaks the prefix property, every row dropped, a Hub that cannot be reached. With
            ``prepared``: no or another kind of ``prepared.json``, another tokenizer, setting or template (at
            construction); a missing or corrupt Arrow file (at setup).

    Example:
        >>> data = ChatDataModule("chats.jsonl", tokenizer="artifacts/teacher", max_seq_length=1024)
    """

    what = "chat data"
    #: the training conversations one per row, before any packing (set up; what a teacher cache stores)
    train_rows = None

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        tokenizer: str | None = None,
        chat_template: str | None = None,
        max_seq_length: int = 2048,
        loss_on: str = "assistant",
        truncation: str = "keep_start",
        batch_size: int = 8,
        num_workers: int = 0,
        num_proc: int | None = None,
        seed: int = 0,
        val_fraction: float = 0.05,
        split: str = "train",
        val_split: str = "validation",
        cache_dir: str | None = None,
        packing: bool = False,
        prepared: str | None = None,
        teacher_tokenizer: str | None = None,
        teacher_chat_template: str | None = None,
    ) -> None:
        if teacher_tokenizer is not None and (packing or prepared is not None):
            raise ValueError(
                "ChatDataModule with teacher_tokenizer= (cross-tokenizer rows) does not support packing=True or"
                f" prepared= yet; got packing={packing}, prepared={prepared!r}"
            )
        if (train is None) == (prepared is None) or (prepared is not None and val is not None):
            raise ValueError(
                f"ChatDataModule reads train= (and val=) or prepared= (a directory prepare_chat wrote), one of"
                f" them; got train={train!r}, val={val!r}, prepared={prepared!r}"
            )
        self.prepared, self.prepared_meta = prepared, read_prepared_chat(prepared) if prepared else None
        if prepared is not None and tokenizer is None:
            tokenizer = str(Path(prepared) / TOKENIZER_DIR)
        if loss_on not in LOSS_ON or truncation not in TRUNCATION:
            raise ValueError(f"loss_on must be one of {LOSS_ON} and truncation one of {TRUNCATION}")
        if max_seq_length < 2:
            raise ValueError(f"need max_seq_length >= 2, got {max_seq_length}")
        super().__init__(
            train, val, tokenizer, chat_template, batch_size, num_workers, num_proc, seed, val_fraction, split,
            val_split, cache_dir,
        )  # fmt: skip
        self.max_seq_length, self.loss_on, self.truncation, self.packing = max_seq_length, loss_on, truncation, packing
        self.collate = PadCollate(self.pad_id)
        self.teacher_tokenizer, self.teacher_chat_template = None, teacher_chat_template
        if teacher_tokenizer is not None:
            from .cross_tokenizer.collate import CrossTokenizerCollator

            self.teacher_tokenizer = (
                load_tokenizer(teacher_tokenizer) if isinstance(teacher_tokenizer, str) else teacher_tokenizer
            )
            self.collate = CrossTokenizerCollator(self.tokenizer, self.teacher_tokenizer, self.collate)
        if prepared is not None:
            check_prepared_chat(self.prepared_meta, self, prepared)

    def prepare_data(self) -> None:
        if self.prepared is None:  # a prepared directory has nothing left to make
            super().prepare_data()

    def _prepare(self):
        if self.prepared is None:
            return super()._prepare()
        return load_prepared_chat(self.prepared, self.prepared_meta)  # memory-mapped and checked: no tokenizing

    def _training_rows(self, rows):
        self.train_rows = rows
        if not self.packing:
            return rows
        # rows fixed once: EpochShuffle then shuffles them, exactly resumable
        lengths = np.minimum(rows.with_format("numpy", columns=["length"])["length"], self.max_seq_length)
        packed = PackedRows(rows, lengths, self.max_seq_length)
        self.summary["train"]["packed rows"] = len(packed)
        return packed

    def _encoded(self, source: str, split: str):
        """The dataset ``source`` tokenized (``_Encoder``'s columns), from the map cache when it is there."""
        dataset = self._source(source, split)
        fmt = detect_format(dataset.column_names, source)
        template = None if fmt == "text" else resolve_template(self.tokenizer, self.chat_template)
        encoder = _Encoder(self.tokenizer, template, fmt, self.loss_on, self.max_seq_length, source)
        key = (fmt, template or "", self.loss_on, str(self.max_seq_length))
        if self.teacher_tokenizer is not None:
            teacher = self.teacher_tokenizer
            t_template = None if fmt == "text" else resolve_template(teacher, self.teacher_chat_template)
            t_encoder = _Encoder(teacher, t_template, fmt, self.loss_on, self.max_seq_length, source)
            encoder = _PairEncoder(encoder, t_encoder)
            key = (*key, "teacher", t_template or "", _tokenizer_identity(teacher).decode("utf-8", "replace"))
        return self._mapped(dataset, source, encoder, key, "chat")

    def _kept(self, dataset, name: str):
        """(the rows that stay under ``truncation``, {name: counts})."""
        lengths, counted = np.asarray(dataset["length"]), np.asarray(dataset["counted"])
        over = lengths > self.max_seq_length
        too_long = over if self.truncation == "drop" else np.zeros_like(over)
        empty = (counted == 0) & ~too_long  # nothing to learn (left after the cut)
        dropped = too_long | empty
        keep = np.flatnonzero(~dropped)
        if len(dataset) and not len(keep):
            raise ValueError(
                f"every one of the {len(dataset)} {name} conversations was dropped (truncation="
                f"{self.truncation!r}, max_seq_length={self.max_seq_length}: {int(over.sum())} longer, "
                f"{int(empty.sum())} with no token to learn left); raise max_seq_length"
            )
        counts = {
            "conversations": len(dataset),
            "rows": len(keep),
            "tokens": int(np.minimum(lengths, self.max_seq_length)[keep].sum()),
            "counted tokens": int(counted[keep].sum()),
            "truncated": int(over[keep].sum()),
            "dropped": int(dropped.sum()),
            "merged boundaries": int(np.asarray(dataset["merged"])[keep].sum()),
        }
        kept = dataset if len(keep) == len(dataset) else dataset.select(keep)
        columns = ["input_ids", "labels"]
        if self.teacher_tokenizer is not None:  # the collator reads the lengths to know which side was cut
            columns += ["length", "teacher_input_ids", "teacher_labels", "teacher_length"]
        return kept.with_format("numpy", columns=columns), {name: counts}

    def describe(self) -> dict[str, Any]:
        described = super().describe()
        if self.teacher_tokenizer is not None:
            described["teacher_tokenizer"] = tokenizer_hash(self.teacher_tokenizer)
        return described
