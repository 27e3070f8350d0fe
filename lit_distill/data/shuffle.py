"""The training order of the map-style data modules: shuffled per epoch, resumable mid-epoch, split over processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class EpochShuffle(DistributedSampler):
    """``RandomSampler``'s order, made resumable in the middle of an epoch, and split over processes.

    The first epoch's seed is drawn from the global RNG as ``RandomSampler`` draws it (so ``seed_everything``
    decides it and the first epoch's order is the same), epoch ``e`` uses ``seed + e``, and the seed is saved
    in checkpoints with the data module. After a resume in the middle of an epoch, the batches already
    trained on (``batches_done()``, from Lightning's progress) are not drawn again: the resumed run sees
    exactly the batches the uninterrupted run would have.

    On ``world_size`` processes, each takes every ``world_size``-th index of the same order, cut to whole batches
    on every process: distinct rows, equal batch counts (an uneven last step would hang), and together the rows
    one process would see when the split rows fill whole batches. It is a ``DistributedSampler`` by type only,
    so that Lightning leaves it in place instead of wrapping it.
    """

    def __init__(
        self, size: int, batch_size: int, batches_done: Callable[[], int], rank: int = 0, world_size: int = 1
    ) -> None:  # fmt: skip
        # no super().__init__(): it asks the process group, and this sampler is told its rank
        self.size, self.batch_size, self.batches_done = size, batch_size, batches_done
        self.rank, self.num_replicas, self.shuffle = rank, world_size, True
        self.seed: int | None = None
        self.epoch = 0
        self.resuming = False

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it before every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        if self.num_replicas == 1:
            return self.size
        return self.size // (self.num_replicas * self.batch_size) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        if self.seed is None:
            self.seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        if self.num_replicas > 1:
            order = order[: len(self) * self.num_replicas][self.rank :: self.num_replicas]
        skip = self.batches_done() * self.batch_size if self.resuming else 0
        self.resuming = False
        return map(int, order[skip:].numpy())  # one index at a time: no list of every row


class ShuffledDataModule(pl.LightningDataModule):
    """A data module whose training batches come in :class:`EpochShuffle`'s order, resumable mid-epoch (the
    shuffle seed is saved in checkpoints) and split over processes. Subclasses set ``batch_size`` and
    ``num_workers``."""

    def __init__(self) -> None:
        super().__init__()
        self.sampler: EpochShuffle | None = None
        self._resumed_seed: int | None = None

    def shuffled_loader(self, dataset: Dataset, collate_fn: Callable | None = None) -> DataLoader:
        """The training DataLoader of ``dataset`` (``collate_fn``: how rows become a batch; default stacking)."""
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        self.sampler = EpochShuffle(len(dataset), self.batch_size, self._batches_done, rank, world)
        if self._resumed_seed is not None:
            self.sampler.seed, self.sampler.resuming = self._resumed_seed, True
            self._resumed_seed = None
        elif world > 1:  # every process must draw the same order: process 0's seed
            seed = int(torch.empty((), dtype=torch.int64).random_().item())
            self.sampler.seed = self.trainer.strategy.broadcast(seed)
        return DataLoader(
            dataset, self.batch_size, sampler=self.sampler, drop_last=True, num_workers=self.num_workers,
            collate_fn=collate_fn,
        )  # fmt: skip

    def _batches_done(self) -> int:
        """Batches of the current epoch the trainer has finished (restored from a checkpoint on resume)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.ready if self.trainer is not None else 0

    def state_dict(self) -> dict[str, Any]:
        return {"shuffle_seed": self.sampler.seed} if self.sampler is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_seed = state_dict.get("shuffle_seed")
