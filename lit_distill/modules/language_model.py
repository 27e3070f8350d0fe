"""Plain causal-LM training: pretraining a teacher, or a student trained alone as the baseline."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from typing_extensions import override

from ..kernels import DistillationOutput
from ..losses import DistillationLoss
from ..models import CausalLM
from .base import DistillationModule, cross_entropy_output


class LanguageModelTraining(DistillationModule):
    """Next-token cross-entropy of one model, no teacher: ``teacher`` is unused and may be None.

    Shares the distillation modules' batches, token-exact normalization, logging and export, so a
    student trained alone is a like-for-like baseline. Arguments as in :class:`DistillationModule`
    (``loss`` only supplies ``ignore_index``).
    """

    needs_teacher = False
    logged_statistics = ("hard",)

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
    ) -> None:
        super().__init__(
            student, None, loss, optimizer, lr_scheduler, fused_linear, chunk_size, vocab_size, on_nonfinite
        )

    @override
    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> DistillationOutput:
        input_ids, attention_mask, labels = self.shifted_inputs(batch)
        logits = self.student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        return cross_entropy_output(logits, labels, self.loss.ignore_index)

    @override
    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        out = self.compute_loss(batch)
        tokens = out.num_tokens.clamp(min=1).float()
        self.val_loss.update(out.hard, weight=tokens)
        self.val_student_ce.update(out.hard, weight=tokens)

    @override
    def on_validation_epoch_end(self) -> None:
        ce = self.val_student_ce.compute()
        self.log("val/loss", ce, prog_bar=True)
        self.log("val/student_ce", ce)
        self.log("val/student_ppl", torch.exp(ce), prog_bar=True)
        self.val_loss.reset()
        self.val_student_ce.reset()
