"""What a ``cache_teacher`` run still has to predict: the shards no earlier run finished, this process's share of
them, and the loader of their sequences (each item carries its ``index`` in the training split, which
``TeacherCacheWriter`` files it under).

Rank ``r`` of ``W`` takes shards ``i`` with ``i % W == r``; a shard counts as finished when its file exists (a
file only appears whole, by rename). Text blocks are read as they are, chat rows right-padded; a cross-tokenizer
data module's own collate (the batch keys of issue 26, the teacher's tokenization included) is used as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from .manifest import CacheSettings, shard_name
from .rows import ConversationRows, IndexedPadCollate


def finished_shards(directory: Path, settings: CacheSettings) -> set[int]:
    """Shards whose file exists (a file only appears whole, by rename)."""
    return {i for i in range(settings.num_shards) if (directory / shard_name(i)).exists()}


class _Sequences(Dataset):
    def __init__(self, blocks: torch.Tensor, indices: list[int]) -> None:
        self.blocks, self.indices = blocks, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        index = self.indices[position]
        return {"index": index, "input_ids": self.blocks[index].long()}  # a memory-mapped uint16 row, prepared


class ShardLoader(pl.LightningDataModule):
    """The sequences of this process's shards that some cache of ``plans`` (directory, settings) lacks, in
    order (rank ``r`` of ``W`` takes shards ``i % W == r``; the caches share one shard plan): text blocks, or
    chat rows right-padded with ``pad_id``."""

    def __init__(
        self,
        rows,
        plans: list[tuple[Path, CacheSettings]],
        batch_size: int,
        pad_id: int | None,
        collate: Callable | None = None,
    ) -> None:
        super().__init__()
        self.rows, self.plans, self.batch_size, self.pad_id = rows, plans, batch_size, pad_id
        self.collate = collate  # the data's own (cross-tokenizer) collate, on its items without "index"

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        settings = self.plans[0][1]
        done = set.intersection(*(finished_shards(d, s) for d, s in self.plans))
        mine = [i for i in range(settings.num_shards) if i % world == rank and i not in done]
        indices = [j for i in mine for j in range(*settings.shard_range(i))]
        if settings.layout == "rows":
            dataset, collate = ConversationRows(self.rows, indices), IndexedPadCollate(self.pad_id)
        else:
            dataset, collate = _Sequences(self.rows, indices), None
        if self.collate is not None:
            collate = IndexedCollate(self.collate)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, collate_fn=collate)


class IndexedCollate:
    """A data module's collate on items that carry their ``index``: the batch it makes, and the indices."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate([{k: v for k, v in item.items() if k != "index"} for item in items])
        return {**batch, "index": torch.tensor([item["index"] for item in items])}
