"""Teacher caches over chat data: one conversation per row, the signal stored only where a token is learned.

A chat row (:class:`~lit_distill.data.ChatDataModule`) learns some of its tokens, the assistant turns; position
``t``'s signal (the teacher's distribution of token ``t + 1``) is used only where token ``t + 1`` is learned, so
only those positions are stored. A rows shard holds, flat over its rows in order:

    input_ids         int32 (tokens,)         the rows' tokens, one row after another
    counted           bool  (tokens,)         whether a token is learned (its label is not ignore_index)
    lengths           int32 (rows,)           tokens per row
    signals           int32 (rows,)           signal positions per row (its learned tokens after the first)
    teacher_ids       int32 (positions, K)    the signal at those positions, row by row, in position order
    teacher_logprobs  fp16  (positions, K)

``validation.safetensors`` holds the held-out rows' ``input_ids``, ``counted`` and ``lengths``. Read back,
a row is the chat batch's row again (``labels`` are ``input_ids`` where counted, ``-100`` elsewhere) with
``teacher_ids`` ``-1`` and ``teacher_logprobs`` ``-inf`` (empty slots) at the positions that learn nothing.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from ..chat import IGNORE_INDEX, PadCollate
from .manifest import ID_DTYPE, LOGPROB_DTYPE


def signal_positions(counted: torch.Tensor) -> torch.Tensor:
    """Where a row of ``counted`` tokens needs the teacher's signal: position ``t`` predicts token ``t + 1``."""
    positions = torch.zeros_like(counted, dtype=torch.bool)
    positions[:-1] = counted[1:]
    return positions


class ConversationRows(Dataset):
    """Rows ``indices`` of a chat split (items with ``input_ids`` and ``labels``), with their index, for the
    teacher's pass."""

    def __init__(self, rows: Any, indices: list[int]) -> None:
        self.rows, self.indices = rows, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        return {"index": index, **self.rows[index]}


class IndexedPadCollate(PadCollate):
    """The chat batch of rows (right-padded, with ``attention_mask``) and their indices."""

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows])
        batch.pop("prompt_mask")
        return {**batch, "index": torch.tensor([r["index"] for r in rows])}


def kept_signal(prediction: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], row: int) -> dict[str, Any]:
    """Row ``row`` of a teacher pass: its tokens, which are learned, and the signal at its signal positions only."""
    length = int(batch["attention_mask"][row].sum())
    counted = batch["labels"][row, :length] != IGNORE_INDEX
    positions = signal_positions(counted)
    return {
        "input_ids": prediction["input_ids"][row, :length].cpu(),
        "counted": counted.cpu(),
        "teacher_ids": prediction["teacher_ids"][row, :length][positions].cpu(),
        "teacher_logprobs": prediction["teacher_logprobs"][row, :length][positions].cpu(),
    }


def rows_shard(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors of a rows shard (see above) from :func:`kept_signal`'s rows, in order."""
    return {
        "input_ids": torch.cat([r["input_ids"] for r in rows]).to(ID_DTYPE),
        "counted": torch.cat([r["counted"] for r in rows]),
        "lengths": torch.tensor([len(r["input_ids"]) for r in rows], dtype=torch.int32),
        "signals": torch.tensor([len(r["teacher_ids"]) for r in rows], dtype=torch.int32),
        "teacher_ids": torch.cat([r["teacher_ids"] for r in rows]).to(ID_DTYPE),
        "teacher_logprobs": torch.cat([r["teacher_logprobs"] for r in rows]).to(LOGPROB_DTYPE),
    }


def validation_tensors(rows: Any) -> dict[str, torch.Tensor]:
    """``validation.safetensors``'s tensors of held-out chat rows (None: no rows)."""
    ids = [np.asarray(r["input_ids"]) for r in rows] if rows is not None else []
    labels = [np.asarray(r["labels"]) for r in rows] if rows is not None else []
    return {
        "input_ids": torch.from_numpy(np.concatenate([np.zeros(0, np.int64), *ids])).to(ID_DTYPE),
        "counted": torch.from_numpy(np.concatenate([np.zeros(0, bool), *(label != IGNORE_INDEX for label in labels)])),
        "lengths": torch.tensor([len(i) for i in ids], dtype=torch.int32),
    }


def _starts(sizes: list[int]) -> list[int]:
    return [0, *itertools.accumulate(sizes)]


class CachedRows(Dataset):
    """The cached chat rows across shards (memory-mapped safetensors), each as the chat batch's row with its
    signal spread back over the row: ``input_ids``, ``labels``, ``teacher_ids`` ``(n, K)``, ``teacher_logprobs``."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.offsets: list[tuple[list[int], list[int]]] = []  # per shard: row starts in tokens, in signals
        sizes = []
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                lengths, signals = f.get_tensor("lengths").tolist(), f.get_tensor("signals").tolist()
            self.offsets.append((_starts(lengths), _starts(signals)))
            sizes.append(len(lengths))
        self.firsts = _starts(sizes)
        self.handles: list[Any] | None = None  # opened lazily, once per DataLoader worker

    def __len__(self) -> int:
        return self.firsts[-1]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.handles is None:
            self.handles = [safe_open(str(f), framework="pt") for f in self.files]
        shard = int(np.searchsorted(self.firsts, index, side="right")) - 1
        handle, row = self.handles[shard], index - self.firsts[shard]
        tokens, signals = self.offsets[shard]
        a, b, c, d = tokens[row], tokens[row + 1], signals[row], signals[row + 1]
        input_ids = handle.get_slice("input_ids")[a:b].long()
        counted = handle.get_slice("counted")[a:b]
        ids, logprobs = handle.get_slice("teacher_ids")[c:d].long(), handle.get_slice("teacher_logprobs")[c:d].float()
        positions = signal_positions(counted)
        teacher_ids = torch.full((b - a, ids.shape[1]), -1, dtype=torch.long)
        teacher_logprobs = torch.full((b - a, ids.shape[1]), -torch.inf)
        teacher_ids[positions], teacher_logprobs[positions] = ids, logprobs
        return {
            "input_ids": input_ids,
            "labels": input_ids.masked_fill(~counted, IGNORE_INDEX),
            "teacher_ids": teacher_ids,
            "teacher_logprobs": teacher_logprobs,
        }


class HeldOutRows(Dataset):
    """The held-out chat rows of ``validation.safetensors`` (``input_ids`` and ``labels``)."""

    def __init__(self, path: Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            self.input_ids, self.counted = f.get_tensor("input_ids").long(), f.get_tensor("counted")
            self.starts = _starts(f.get_tensor("lengths").tolist())

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        a, b = self.starts[row], self.starts[row + 1]
        input_ids = self.input_ids[a:b]
        return {"input_ids": input_ids, "labels": input_ids.masked_fill(~self.counted[a:b], IGNORE_INDEX)}


class SignalPadCollate(PadCollate):
    """The chat batch of cached rows, with ``teacher_ids`` padded with ``-1`` and ``teacher_logprobs`` with
    ``-inf`` (empty slots, at padding that the labels ignore)."""

    def __call__(self, rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        batch.pop("prompt_mask")
        length, slots = batch["input_ids"].shape[1], rows[0]["teacher_ids"].shape[1]
        ids = torch.full((len(rows), length, slots), -1, dtype=torch.long)
        logprobs = torch.full((len(rows), length, slots), -torch.inf)
        for i, row in enumerate(rows):
            ids[i, : len(row["teacher_ids"])] = row["teacher_ids"]
            logprobs[i, : len(row["teacher_logprobs"])] = row["teacher_logprobs"]
        return {**batch, "teacher_ids": ids, "teacher_logprobs": logprobs}
