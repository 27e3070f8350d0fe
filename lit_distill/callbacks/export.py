"""Export the trained model(s) in Hugging Face format when fitting ends."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override


class ExportModel(Callback):
    """Write the student (and, with ``teacher_directory``, a co-trained teacher) with ``save_pretrained``.

    Works under DDP, FSDP, FSDP2 and DeepSpeed: process 0 writes the full weights, gathered from every process.

    Args:
        directory: where the student goes (created if needed); ``from_pretrained(directory)`` loads it.
        teacher_directory: where a co-distillation teacher goes; None skips it.
        tokenizer: also save the data module's tokenizer next to each model (default True).

    Example:
        >>> Trainer(callbacks=[ExportModel("artifacts/student")])
    """

    def __init__(self, directory: str, teacher_directory: str | None = None, tokenizer: bool = True) -> None:
        super().__init__()
        self.directory = directory
        self.teacher_directory = teacher_directory
        self.tokenizer = tokenizer

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Every process saves: sharded weights (FSDP, ZeRO-3) are gathered first; process 0 writes the files.
        pl_module.save_student(self.directory)
        targets = [self.directory]
        if self.teacher_directory is not None:
            pl_module.save_teacher(self.teacher_directory)
            targets.append(self.teacher_directory)
        if trainer.global_rank == 0:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule is not None else None
            if self.tokenizer and tokenizer is not None:
                for directory in targets:
                    tokenizer.save_pretrained(directory)
            rank_zero_info(f"exported {' and '.join(str(Path(d).resolve()) for d in targets)}")
        trainer.strategy.barrier("export")  # the files are complete when any process returns from fit
