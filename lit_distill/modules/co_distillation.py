"""Co-distillation: teacher and student train together, the student on the teacher's current beliefs."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn

from ..losses import DistillationLoss
from ..models import CausalLM
from .base import DistillationModule


class CoDistillation(DistillationModule):
    """Teacher and student both trainable from the start, in one fused pass per step.

    The teacher trains on ``teacher_ce_weight * CE(teacher, labels)``, the student on
    ``alpha * T² * D(teacher ‖ student) + (1 - alpha) * CE(student, labels)`` against the teacher's current
    probabilities (the soft term sends no gradient to the teacher). Both models are in the checkpoint and
    either can be exported.

    Args:
        teacher_ce_weight: weight of the teacher's cross-entropy (> 0); overrides the loss's value.
        teacher_lr: learning rate of the teacher's parameter group (None: the optimizer's default).
        Other arguments as in :class:`DistillationModule`.

    Raises:
        ValueError: if ``teacher_ce_weight`` is not positive.
    """

    teacher_trains = True

    def __init__(
        self,
        student: nn.Module | CausalLM,
        teacher: nn.Module | CausalLM | None = None,
        loss: DistillationLoss | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        fused_linear: bool = True,
        chunk_size: int | None = None,
        vocab_size: int | None = None,
        on_nonfinite: str = "raise",
        teacher_ce_weight: float = 1.0,
        teacher_lr: float | None = None,
    ) -> None:
        if not teacher_ce_weight > 0:
            raise ValueError(
                f"co-distillation trains the teacher through teacher_ce_weight > 0, got {teacher_ce_weight}"
            )
        super().__init__(
            student, teacher, loss, optimizer, lr_scheduler, fused_linear, chunk_size, vocab_size, on_nonfinite
        )
        self.loss.teacher_ce_weight = teacher_ce_weight
        self.teacher_lr = teacher_lr
        self.teacher.requires_grad_(True)

    def parameter_groups(self) -> list[dict[str, Any]]:
        teacher = {"params": [p for p in self.teacher.parameters() if p.requires_grad]}
        if self.teacher_lr is not None:
            teacher["lr"] = self.teacher_lr
        return [*super().parameter_groups(), teacher]

    def save_teacher(self, directory: str) -> None:
        """Write the co-trained teacher in Hugging Face format (every process calls it, as ``save_student``)."""
        self._save_pretrained("teacher", directory)
