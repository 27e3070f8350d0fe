"""Offline distillation: the student learns from a teacher cache, with no teacher in memory."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from ..kernels import DistillationOutput
from ..models import CausalLM, fusable_head
from .attention import attention_inputs
from .causal_lm import CausalLMModule, cross_entropy_output

#: The loss keywords the sparse loss takes from the module's ``DistillationLoss``.
SPARSE_KEYWORDS = ("divergence", "beta", "temperature", "t2_scaling", "alpha", "vocab_size", "ignore_index", "backend")


class OfflineDistillation(CausalLMModule):
    """Distillation from a stored sparse teacher signal (:mod:`lit_distill.data.teacher_cache`).

    Each training batch carries the teacher's top-k or sampled tokens and their log-probabilities per
    position (``teacher_ids``, ``teacher_logprobs``, from :class:`~lit_distill.data.TeacherCacheDataModule`);
    the student is trained on ``alpha * T² * D(teacher ‖ student) + (1 - alpha) * CE(student, labels)`` over
    those tokens (see :func:`lit_distill.sparse_distillation_loss`), from its hidden states and head weight
    without the full logits where its head is a plain linear layer. A counted position with no stored token (a
    cross-tokenizer cache between boundaries) trains on its label at full weight. Normalization, resuming and DDP
    are as in the other modules. Validation measures the student's cross-entropy on the cache's held-out text (on
    a chat cache, on the held-out conversations' learned tokens). Packed batches (``position_ids``) are honoured.

    Args:
        student: the model to train.
        *args, **kwargs: ``loss`` (its temperature must be the cache's), ``optimizer``, ... as in
            :class:`~lit_distill.modules.causal_lm.CausalLMModule`.
        tail: add a last bucket holding the mass outside the stored tokens on both sides (top-k caches; any
            divergence), or not (the stored probabilities renormalized; forward KL; sampled caches).
        fused_linear: use the fused-linear sparse loss where the student's head allows it.
        chunk_size: tokens per chunk of the fused-linear path (None: from a memory budget).

    Raises:
        ValueError: at construction for a loss this path cannot compute (``hard_labels="teacher_argmax"``,
            teacher cross-entropy, ``tail=False`` with another divergence than forward KL); at setup for a cache
            of another temperature or vocabulary, or a ``TemperatureScheduler`` (the cache is at one temperature).
    """

    logged_statistics = ("soft", "hard", "agreement")

    def __init__(
        self,
        student: nn.Module | CausalLM,
        *args: Any,
        tail: bool = True,
        fused_linear: bool = True,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(student, *args, **kwargs)
        self.tail, self.fused_linear, self.chunk_size = tail, fused_linear, chunk_size
        if self.loss.hard_labels != "labels" or self.loss.teacher_ce_weight > 0:
            raise ValueError(
                "OfflineDistillation has no teacher logits: the loss needs hard_labels='labels' and teacher_ce_weight=0"
            )
        if not tail and self.loss.divergence != "forward_kl":
            raise ValueError(
                f"tail=False renormalizes the stored probabilities, which only forward_kl can compare; got"
                f" divergence={self.loss.divergence!r} (use tail=True)"
            )

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        settings = getattr(getattr(self.trainer, "datamodule", None), "settings", None)
        if settings is None:
            return  # batches from elsewhere: their shapes are checked by the loss
        if abs(settings.temperature - self.loss.temperature) > 1e-9:
            raise ValueError(
                f"the teacher cache holds log-probabilities at temperature {settings.temperature}, the loss is at"
                f" {self.loss.temperature}: set the loss's temperature to the cache's, or write a cache at"
                f" {self.loss.temperature}"
            )
        # Any schedule of the loss's temperature (TemperatureScheduler or a custom one), found by the attribute
        # it sets: the callbacks sit a floor above the modules, so they are not imported here.
        if any(getattr(c, "attribute", None) == "temperature" for c in self.trainer.callbacks):
            raise ValueError(
                "a TemperatureScheduler cannot run with a teacher cache: the cache holds the teacher at one"
                f" temperature ({settings.temperature}); schedule alpha instead, or distil online"
            )
        self.check_tokenizer_fits("student", self.student, settings.vocab_size)

    @override
    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> DistillationOutput:
        from ..kernels.sparse import fused_linear_sparse_distillation_loss, sparse_distillation_loss

        input_ids, attention_mask, labels = self.shifted_inputs(batch)
        if "teacher_ids" not in batch or "teacher_logprobs" not in batch:
            raise ValueError(
                "OfflineDistillation needs batches with teacher_ids and teacher_logprobs (a teacher cache)"
            )
        teacher_ids = batch["teacher_ids"][:, :-1]
        teacher_logprobs = batch["teacher_logprobs"][:, :-1]
        options = {name: getattr(self.loss, name) for name in SPARSE_KEYWORDS}
        options.update(tail=self.tail, reduction="sum")
        head = fusable_head(self.student) if self.fused_linear else None
        masks = attention_inputs(self.student, attention_mask, batch.get("position_ids"))  # packed rows too
        if head is None:
            logits = self.student(input_ids=input_ids, **masks).logits[:, :-1]
            output = sparse_distillation_loss(logits, teacher_ids, teacher_logprobs, labels, **options)
            return self._labels_where_no_signal(
                output, teacher_ids, labels, lambda where, empty, lp: sparse_distillation_loss(
                    logits[where], empty, lp, labels[where], **{**options, "alpha": 0.0}
                ).loss,
            )  # fmt: skip
        hidden = self.student.base_model(input_ids=input_ids, **masks).last_hidden_state[:, :-1]
        fused = dict(student_bias=head.bias, chunk_size=self.chunk_size, **options)
        output = fused_linear_sparse_distillation_loss(
            hidden, head.weight, teacher_ids, teacher_logprobs, labels, **fused
        )
        return self._labels_where_no_signal(
            output, teacher_ids, labels, lambda where, empty, lp: fused_linear_sparse_distillation_loss(
                hidden[where], head.weight, empty, lp, labels[where], **{**fused, "alpha": 0.0}
            ).loss,
        )  # fmt: skip

    def _labels_where_no_signal(self, output, teacher_ids, labels, label_ce) -> DistillationOutput:
        """``output`` with ``alpha · CE`` added at the counted positions whose slots are all empty: the cache holds
        no teacher there (a cross-tokenizer cache between boundaries), so the label stands in for it and the
        position trains on its label at full weight, as the online ``CrossTokenizerDistillation`` does (at
        ``(1 - alpha)`` alone, those positions ended 0.45 nats worse at alpha 0.5: docs/cross-tokenizer.md).
        ``label_ce(where, ids, logprobs)``: the same loss at alpha 0 (the summed CE) on those rows' empty slots."""
        alpha, ignore = self.loss.alpha, self.loss.ignore_index
        empty = (teacher_ids < 0).all(-1) & (labels != ignore)
        if alpha == 0 or not bool(empty.any()):  # one host sync; a cache of one tokenizer has no empty position
            return output
        slots = teacher_ids[empty][:, :1]  # -1: the rows' first empty slot is enough
        ce = label_ce(empty, slots, torch.full(slots.shape, -math.inf, device=slots.device))
        return output._replace(loss=output.loss + alpha * ce)

    @override
    def validation_output(self, batch: Mapping[str, torch.Tensor]) -> DistillationOutput:
        # Held-out text has no teacher signal: the student's cross-entropy is the validation loss.
        input_ids, attention_mask, labels = self.shifted_inputs(batch)
        masks = attention_inputs(self.student, attention_mask, batch.get("position_ids"))
        logits = self.student(input_ids=input_ids, **masks).logits[:, :-1]
        return cross_entropy_output(logits, labels, self.loss.ignore_index)
