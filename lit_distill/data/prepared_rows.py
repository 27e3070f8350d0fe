"""The rows of a prepared text directory (``prepared.py``): one at a time for training, or all as a tensor."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .prepared import PreparedText, token_file


def mapped_blocks(directory: str | Path, split: str, meta: PreparedText):
    """The split's rows as a ``(rows, seq_len)`` tensor of the stored dtype over the memory-mapped token file: no
    row is read until it is indexed (copy-on-write: the file is never written)."""
    import torch

    rows = meta.rows(split)
    tokens = np.memmap(token_file(directory, split), dtype=meta.dtype, mode="c", shape=(rows * meta.seq_len,))
    return torch.from_numpy(tokens.reshape(rows, meta.seq_len))


class PreparedRows:
    """One split of a prepared directory as ``{"input_ids": row}`` items (int64), its first ``limit`` rows when
    given. Each row is read with one ``pread`` of the token file, not through a memory map: touching a mapped
    row maps its neighbourhood too (the kernel's fault-around, 64 KiB a fault), so a training process's resident
    memory grew by 50 MiB per 200 MiB of corpus within 50 steps; read this way it does not grow. The file is
    opened on first use in each process (a DataLoader worker, forked or spawned, opens its own)."""

    def __init__(self, directory: str | Path, split: str, meta: PreparedText, limit: int | None = None) -> None:
        self.directory, self.split, self.meta = Path(directory), split, meta
        self.size = meta.rows(split) if limit is None else min(limit, meta.rows(split))
        self.row_bytes = meta.seq_len * np.dtype(meta.dtype).itemsize
        self._fd: int | None = None
        self._blocks = None

    @property
    def blocks(self):
        """The rows as a memory-mapped ``(rows, seq_len)`` tensor, to read many rows in order (the teacher cache)."""
        if self._blocks is None:
            self._blocks = mapped_blocks(self.directory, self.split, self.meta)[: self.size]
        return self._blocks

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        import torch

        if not 0 <= index < self.size:
            raise IndexError(f"row {index} of {self.size}")
        if self._fd is None:
            self._fd = os.open(token_file(self.directory, self.split), os.O_RDONLY)
        data = os.pread(self._fd, self.row_bytes, index * self.row_bytes)
        return {"input_ids": torch.from_numpy(np.frombuffer(data, dtype=self.meta.dtype).astype(np.int64))}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None, "_blocks": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
