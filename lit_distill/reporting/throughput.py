"""Training tokens per second, timed on the device's clock rather than the host's, and the share of the time
spent waiting for data."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from typing_extensions import override


class TokensPerSecond(Callback):
    """Log ``train/tokens_per_sec`` (the batch's ``input_ids`` elements over the seconds the batch took) and
    ``train/data_wait_fraction`` (the share of the training time so far spent between one batch's end and the
    next one's start: fetching and collating the batch, validation excluded).

    CUDA runs asynchronously, so the clock is read after ``torch.cuda.synchronize()`` at both ends of the
    batch; without it the host's time measures only how fast kernels were queued. The distillation modules
    add this callback themselves (``configure_callbacks``); Lightning's ``ThroughputMonitor`` is the choice
    for rates averaged over a window and FLOP utilization. A data wait fraction near 0 means the loader keeps
    up; near 1, the model waits on data (more ``num_workers``, or prepare the data once).

    Example:
        >>> Trainer(callbacks=[TokensPerSecond()])
    """

    def __init__(self) -> None:
        super().__init__()
        self._start: float | None = None
        self._end: float | None = None  # the last batch's end: the wait for the next batch starts there
        self.wait_seconds = 0.0  # between batches, validation excluded
        self.step_seconds = 0.0  # inside batches

    @property
    def data_wait_fraction(self) -> float:
        """The share of the training time so far spent waiting for batches (0 before the first)."""
        total = self.wait_seconds + self.step_seconds
        return self.wait_seconds / total if total > 0 else 0.0

    @staticmethod
    def _now(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wait_seconds = self.step_seconds = 0.0

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end = self._now(pl_module.device)  # the epoch's first wait includes starting the loader's workers

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pause(pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._end = self._now(pl_module.device)

    def _pause(self, pl_module: pl.LightningModule) -> None:
        """Count the wait up to now: what follows (validation) is not waiting for data."""
        if self._end is not None:
            self.wait_seconds += self._now(pl_module.device) - self._end
            self._end = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._start = self._now(pl_module.device)
        if self._end is not None:
            self.wait_seconds += self._start - self._end
            self._end = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._start is None:
            return
        self._end = self._now(pl_module.device)
        seconds = max(self._end - self._start, 1e-9)
        self.step_seconds += seconds
        self._start = None
        pl_module.log("train/data_wait_fraction", self.data_wait_fraction, on_step=True, on_epoch=False)
        if isinstance(batch, dict) and "input_ids" in batch:
            pl_module.log("train/tokens_per_sec", batch["input_ids"].numel() / seconds, on_step=True, on_epoch=False)
