"""Ctrl-C that leaves a resumable checkpoint instead of losing the run since the last one."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

# Warnings, so that they reach stderr even where no logging is configured (Python's last-resort handler).
log = logging.getLogger(__name__)


class CheckpointOnInterrupt(Callback):
    """On the first Ctrl-C (SIGINT), finish the optimizer step under way, save a checkpoint, then stop.

    Saving between optimizer steps (never inside one, where the weights may be half updated) makes the
    checkpoint as good as one from ``ModelCheckpoint``: ``Trainer.fit(..., ckpt_path=path)`` (or
    ``lit-distill fit ... --ckpt_path path``) continues the run. The run then stops the way Ctrl-C stops
    Lightning (``SystemExit(1)`` after a graceful shutdown). A second Ctrl-C stops at once, without saving.
    With several processes they agree, at each step boundary, on whether any of them was interrupted (one
    all-reduce of a flag per optimizer step), so that all save the same step. The handler is installed
    only in the main thread; elsewhere the callback does nothing.

    Args:
        dirpath: where the checkpoint goes; None: the ``ModelCheckpoint`` callback's directory, else
            ``<default_root_dir>/checkpoints``.
        filename: the checkpoint's file name.

    Example:
        >>> Trainer(callbacks=[CheckpointOnInterrupt()])   # lit-distill fit adds it by default
    """

    def __init__(self, dirpath: str | None = None, filename: str = "interrupted.ckpt") -> None:
        super().__init__()
        self.dirpath = dirpath
        self.filename = filename
        self.requested = False
        self.saved_path: Path | None = None
        self._previous_handler: Any = None
        self._step_at_batch_start = 0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed here, after Lightning has recorded the handlers it restores when the run ends.
        if threading.current_thread() is threading.main_thread():
            self.requested = False
            self._previous_handler = signal.signal(signal.SIGINT, self._on_interrupt)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handler()

    def _restore_handler(self) -> None:
        # Only our own: on an exception Lightning ignores SIGINT while it shuts down, then restores the rest.
        if self._previous_handler is not None and signal.getsignal(signal.SIGINT) == self._on_interrupt:
            signal.signal(signal.SIGINT, self._previous_handler)
        self._previous_handler = None

    def _on_interrupt(self, signum: int, frame: Any) -> None:
        self.requested = True
        self._restore_handler()  # a second Ctrl-C interrupts at once
        log.warning(
            "Interrupted: finishing the current optimizer step, then saving a checkpoint (Ctrl-C again to stop"
            " at once, without it)"
        )

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # inside an optimizer step (gradient accumulation): its micro-batches are not in a checkpoint
        requested = self.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        if trainer.is_global_zero:
            log.warning(
                f"Saved a resumable checkpoint at step {trainer.global_step} to {path}. Resume with"
                f" Trainer.fit(..., ckpt_path={str(path)!r}) or lit-distill fit ... --ckpt_path {path}"
            )
        raise KeyboardInterrupt  # Lightning's own Ctrl-C shutdown from here on

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        """Where the checkpoint of an interrupted run goes."""
        dirpath = self.dirpath
        if dirpath is None and trainer.checkpoint_callback is not None:
            dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        if dirpath is None:
            dirpath = Path(trainer.default_root_dir) / "checkpoints"
        return Path(dirpath) / self.filename
