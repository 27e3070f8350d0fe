"""Co-distillation: teacher and student train together, the student on the teacher's current beliefs."""

from __future__ import annotations

from typing import Any

from .distillation import DistillationModule


class CoDistillation(DistillationModule):
    """Teacher and student both trainable from the start, in one fused pass per step.

    The teacher trains on ``teacher_ce_weight * CE(teacher, labels)``, the student on
    ``alpha * T² * D(teacher ‖ student) + (1 - alpha) * CE(student, labels)`` against the teacher's current
    probabilities (the soft term sends no gradient to the teacher). Both models are in the checkpoint and
    either can be exported (:meth:`save_teacher`, ``ExportModel(teacher_directory=...)``).

    Args:
        teacher_ce_weight: weight of the teacher's cross-entropy (> 0); overrides the loss's value.
        teacher_lr: learning rate of the teacher's parameter group (None: the optimizer's default).
        *args, **kwargs: as in :class:`~lit_distill.modules.distillation.DistillationModule`.

    Raises:
        ValueError: if ``teacher_ce_weight`` is not positive.
    """

    teacher_trains = True

    def __init__(self, *args: Any, teacher_ce_weight: float = 1.0, teacher_lr: float | None = None, **kwargs: Any):
        if not teacher_ce_weight > 0:
            raise ValueError(
                f"co-distillation trains the teacher through teacher_ce_weight > 0, got {teacher_ce_weight}"
            )
        super().__init__(*args, **kwargs)
        self.loss.teacher_ce_weight = teacher_ce_weight
        self.teacher_lr = teacher_lr
        self.teacher.requires_grad_(True)

    def parameter_groups(self) -> list[dict[str, Any]]:
        teacher = {"params": [p for p in self.teacher.parameters() if p.requires_grad]}
        if self.teacher_lr is not None:
            teacher["lr"] = self.teacher_lr
        return [*super().parameter_groups(), teacher]
