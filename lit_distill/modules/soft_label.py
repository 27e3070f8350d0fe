"""Soft-label distillation: the student matches the teacher's full (tempered) distribution."""

from __future__ import annotations

from .distillation import DistillationModule


class SoftLabelDistillation(DistillationModule):
    """Hinton-style knowledge distillation against a frozen teacher.

    Every batch runs the teacher (no gradient) and trains the student on
    ``alpha * T² * D(teacher ‖ student) + (1 - alpha) * CE(student, labels)``; the divergence, temperature
    and alpha come from the loss (schedule them with ``AlphaScheduler`` / ``TemperatureScheduler``).
    Arguments as in :class:`DistillationModule`.

    Example:
        >>> module = SoftLabelDistillation(student, teacher, loss=DistillationLoss(temperature=2.0, alpha=0.5))
        >>> Trainer(max_steps=1000).fit(module, datamodule)
    """
