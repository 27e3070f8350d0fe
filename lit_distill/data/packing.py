"""Packing: several conversations per row, each with its own ``position_ids`` (``ChatDataModule(packing=True)``).

Rows are packed once, at setup, by best-fit decreasing over the whole split: deterministic (the same rows on
every process and every run, so the resumable row shuffle stays exact) and tight (TRL's ``bfd`` does the same).
The modules turn ``position_ids`` into a block-diagonal causal mask (``lit_distill/modules/attention.py``).
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np
from torch.utils.data import Dataset

IGNORE_INDEX = -100


def pack_lengths(lengths: list[int] | np.ndarray, capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity`` tokens, by best-fit decreasing.

    The longest item goes first, into the open row it fills most tightly (a new row when none has room); ties
    go to the lower index. Each row lists its indices in ascending order; the rows come in the order they were
    opened.

    Raises:
        ValueError: an item longer than ``capacity``, or one of length < 1.

    Example:
        >>> pack_lengths([5, 3, 4, 2], capacity=7)
        [[0, 3], [1, 2]]
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError(f"every length must lie in [1, {capacity}]; got {lengths.min()}..{lengths.max()}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: the first with room >= n fits tightest
    for index in np.argsort(-lengths, kind="stable"):
        n = int(lengths[index])
        k = bisect.bisect_left(free, (n, -1))
        if k == len(free):
            rows.append([int(index)])
            room, row = capacity - n, len(rows) - 1
        else:
            room, row = free.pop(k)
            rows[row].append(int(index))
            room -= n
        if room > 0:
            bisect.insort(free, (room, row))
    return [sorted(row) for row in rows]


def restarting_positions(lengths: list[int], total: int | None = None) -> np.ndarray:
    """``position_ids`` of a row of documents of ``lengths``: 0, 1, ... restarting at each; the padding up to
    ``total`` continues the last document's count (its keys are masked, and the count stays below ``total``).

    Example:
        >>> restarting_positions([3, 2], total=7).tolist()
        [0, 1, 2, 0, 1, 2, 3]
    """
    total = sum(lengths) if total is None else total
    head = [np.arange(n) for n in lengths[:-1]]
    return np.concatenate([*head, np.arange(total - sum(lengths[:-1]))]).astype(np.int64)


class PackedRows(Dataset):
    """Rows of several conversations of ``dataset`` (rows with ``input_ids`` and ``labels``), as :func:`pack_lengths`
    groups them: their ids concatenated, each conversation's first label ``-100`` (the previous conversation's
    last position must not learn to predict it), and ``position_ids`` restarting at each conversation."""

    def __init__(self, dataset: Any, lengths: list[int] | np.ndarray, capacity: int) -> None:
        self.dataset, self.rows = dataset, pack_lengths(lengths, capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        parts = [self.dataset[int(j)] for j in self.rows[i]]
        labels = [np.asarray(p["labels"], dtype=np.int64).copy() for p in parts]
        for label in labels:
            label[0] = IGNORE_INDEX
        return {
            "input_ids": np.concatenate([np.asarray(p["input_ids"], dtype=np.int64) for p in parts]),
            "labels": np.concatenate(labels),
            "position_ids": restarting_positions([len(label) for label in labels]),
        }
