"""Training tokens per second, timed on the device's clock rather than the host's."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


class TokensPerSecond(Callback):
    """Log ``train/tokens_per_sec``: the batch's ``input_ids`` elements over the seconds the batch took.

    CUDA runs asynchronously, so the clock is read after ``torch.cuda.synchronize()`` at both ends of the
    batch; without it the host's time measures only how fast kernels were queued. The distillation modules
    add this callback themselves (``configure_callbacks``); Lightning's ``ThroughputMonitor`` is the choice
    for rates averaged over a window and FLOP utilization.

    Example:
        >>> Trainer(callbacks=[TokensPerSecond()])
    """

    def __init__(self) -> None:
        super().__init__()
        self._start: float | None = None

    @staticmethod
    def _now(device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._start = self._now(pl_module.device)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._start is None or not isinstance(batch, dict) or "input_ids" not in batch:
            return
        seconds = max(self._now(pl_module.device) - self._start, 1e-9)
        pl_module.log("train/tokens_per_sec", batch["input_ids"].numel() / seconds, on_step=True, on_epoch=False)
