"""A teacher's sparse signal per position: its top-k log-probabilities, or tokens sampled from it.

``sparse_signal`` is the math; ``TeacherSignal`` runs a teacher over batches of sequences under
``Trainer.predict`` and returns the signal of every position, which ``TeacherCacheWriter`` stores;
``SharedTeacherPass`` draws several signals from one teacher forward. ``CrossTokenizerPass`` runs the teacher
on its own tokenization of the rows (the cross-tokenizer batch keys) and stores its signal, binned into the
student's vocabulary, at the student's boundary positions (:meth:`TeacherSignal.mapped_signal_of`).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from ...models import CausalLM, build
from ..cross_tokenizer.vocab_map import VocabularyMap
from .manifest import METHODS

#: the keys a batch of a cross-tokenizer data module carries beside the student's (the spec of issue 26)
CROSS_TOKENIZER_KEYS = ("teacher_input_ids", "teacher_attention_mask", "boundary_student", "boundary_teacher")


def sparse_signal(
    logits: torch.Tensor,
    *,
    method: str,
    k: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, logprobs)`` of shape ``(..., k)`` from ``(..., V)`` teacher logits.

    ``method="topk"``: the k most likely tokens and their log-probabilities at ``temperature``.
    ``method="sampled"``: k draws from the teacher's distribution at ``temperature``, with replacement;
    each distinct token once, with the log of its share of the draws (its count / k), empty slots -1 with
    -inf. The shares' expectation is the teacher's probability, so a forward KL against them has the full
    forward KL's gradient in expectation (Anshumann et al. 2025, "Sparse Logit Sampling").
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if k < 1 or k > logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1]}] (the vocabulary), got {k}")
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    lead = logprobs.shape[:-1]
    if method == "topk":
        values, ids = logprobs.topk(k, dim=-1)
        return ids, values
    rows = logprobs.reshape(-1, logprobs.shape[-1])
    draws = torch.multinomial(rows.exp(), k, replacement=True, generator=generator).sort(dim=-1).values
    # Runs of equal sorted draws are one token: run index per draw, then each run's token and length.
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    run = starts.cumsum(-1) - 1
    counts = torch.zeros(draws.shape, dtype=torch.float32, device=draws.device).scatter_add_(
        -1, run, torch.ones_like(draws, dtype=torch.float32)
    )
    ids = torch.full_like(draws, -1).scatter_(-1, run, draws)
    shares = torch.where(counts > 0, (counts / k).log(), -math.inf)
    return ids.reshape(*lead, k), shares.reshape(*lead, k)


class TeacherSignal(pl.LightningModule):
    """A frozen teacher whose ``predict_step`` returns the sparse signal of every position of a batch.

    Args:
        teacher: a Hugging Face causal LM or a :class:`~lit_distill.models.CausalLM` spec.
        method: ``"topk"`` (the k most likely tokens) or ``"sampled"`` (``samples`` draws per position).
        k: slots per position for ``"topk"``.
        samples: draws per position for ``"sampled"`` (also its number of slots).
        temperature: the temperature of the stored log-probabilities; train with the same one.
        seed: seeds the draws: sequence ``i`` uses ``seed + i``, so a resumed or multi-process run draws
            exactly what one uninterrupted process would.
        vocab_size, special_tokens: the tokenizer's, for a teacher given as a config (the command line links
            them from the data).
    """

    def __init__(
        self,
        teacher: nn.Module | CausalLM,
        method: str = "topk",
        k: int = 64,
        samples: int = 64,
        temperature: float = 1.0,
        seed: int = 0,
        vocab_size: int | None = None,
        special_tokens: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if k < 1 or samples < 1:
            raise ValueError(f"k and samples must be at least 1, got k={k}, samples={samples}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.teacher = build(teacher, vocab_size, special_tokens).requires_grad_(False).eval()
        self.method, self.k, self.samples, self.temperature, self.seed = method, k, samples, temperature, seed
        self.tokenizer_size = vocab_size
        self.source = getattr(teacher, "name_or_path", None) or (
            "config" if isinstance(teacher, CausalLM) else type(teacher).__name__
        )

    @property
    def slots(self) -> int:
        return self.k if self.method == "topk" else self.samples

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> dict[str, torch.Tensor]:
        return self.signal_of(self.teacher_logits(batch), batch)

    @torch.no_grad()
    def teacher_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """The teacher's logits of ``batch["input_ids"]`` over the tokenizer's vocabulary."""
        # chat rows come right-padded: the mask keeps the padding out (causal attention already does)
        logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        if self.tokenizer_size is not None:
            logits = logits[..., : self.tokenizer_size]  # padding columns of the head are no tokens
        return logits

    def mapped_signal_of(
        self, logits: torch.Tensor, batch: dict[str, Any], vocabulary_map: VocabularyMap
    ) -> dict[str, torch.Tensor]:
        """This signal in the student's ids, from the teacher's ``logits`` ``[B, Tt, Vt]`` of
        ``batch["teacher_input_ids"]``: at each pair of ``boundary_student`` / ``boundary_teacher`` (prediction
        positions where both models have read the same bytes) the teacher's distribution is binned into the
        student's vocabulary (``vocabulary_map``) at T=1, tempered there, and its top-k (``"topk"``) or k draws
        (``"sampled"``) stored at the student's position (without the online loss's move of the label's mass:
        the cache does not read the labels' bytes). Every other student
        position holds empty slots (id -1, log-probability -inf): no teacher there, so ``OfflineDistillation``
        trains it on its label at full weight.

        Returns:
            ``index``, the student's ``input_ids`` ``[B, Ts]``, ``teacher_ids`` ``[B, Ts, K]`` (student ids) and
            ``teacher_logprobs`` ``[B, Ts, K]``, as :meth:`signal_of` returns them.
        """
        rows, length = batch["input_ids"].shape
        ids = torch.full((rows, length, self.slots), -1, dtype=torch.long, device=logits.device)
        logprobs = torch.full((rows, length, self.slots), -math.inf, device=logits.device)
        pairs = zip(batch["boundary_student"], batch["boundary_teacher"], batch["index"].tolist(), strict=True)
        for row, (student_at, teacher_at, index) in enumerate(pairs):
            kept = student_at >= 0
            student_at, teacher_at = student_at[kept], teacher_at[kept]
            if not len(student_at):
                continue
            # binned at T=1 (the teacher's distribution over the student's next token), tempered after, as the
            # online loss does (cross_tokenizer/loss.py)
            binned = vocabulary_map.bin_probs(torch.softmax(logits[row, teacher_at].float(), dim=-1)).log()
            generator = None
            if self.method == "sampled":
                generator = torch.Generator(logits.device).manual_seed(self.seed + index)
            i, lp = sparse_signal(
                binned, method=self.method, k=self.slots, temperature=self.temperature, generator=generator
            )
            ids[row, student_at], logprobs[row, student_at] = i.masked_fill(lp == -math.inf, -1), lp.float()
        return {
            "index": batch["index"],
            "input_ids": batch["input_ids"],
            "teacher_ids": ids,
            "teacher_logprobs": logprobs,
        }

    def signal_of(self, logits: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """This signal of every position of ``batch``, from the teacher's ``logits`` of it."""
        ids, logprobs = [], []
        for row, index in zip(logits, batch["index"].tolist(), strict=True):
            generator = None
            if self.method == "sampled":
                generator = torch.Generator(row.device).manual_seed(self.seed + index)
            i, lp = sparse_signal(
                row, method=self.method, k=self.slots, temperature=self.temperature, generator=generator
            )
            ids.append(i)
            logprobs.append(lp)
        return {
            "index": batch["index"],
            "input_ids": batch["input_ids"],
            "teacher_ids": torch.stack(ids),
            "teacher_logprobs": torch.stack(logprobs),
        }


class SharedTeacherPass(pl.LightningModule):
    """Several signals of one teacher from one forward pass per batch: ``predict_step`` returns their
    predictions in order (``cache_teacher`` with several signals writes each to its own cache)."""

    def __init__(self, signals: list[TeacherSignal]) -> None:
        super().__init__()
        if any(s.teacher is not signals[0].teacher or s.tokenizer_size != signals[0].tokenizer_size for s in signals):
            raise ValueError(
                "signals written in one teacher pass must share one teacher (the same model object) and vocabulary"
            )
        self.signals = nn.ModuleList(signals)

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> list[dict[str, torch.Tensor]]:
        logits = self.signals[0].teacher_logits(batch)
        return [signal.signal_of(logits, batch) for signal in self.signals]


class CrossTokenizerPass(pl.LightningModule):
    """The teacher's signal of several :class:`TeacherSignal` s of one teacher (or one), in a student's ids.

    ``predict_step`` runs the teacher once per batch on ``teacher_input_ids`` / ``teacher_attention_mask``
    (the teacher's own tokenization of the rows, from a data module built with ``teacher_tokenizer=``), keeps the
    logits of the teacher tokenizer's ``teacher_tokens`` ids (a padded head's extra columns are no tokens) and
    returns each signal's :meth:`TeacherSignal.mapped_signal_of` (a list when ``several``).
    """

    def __init__(self, signals: list[TeacherSignal], vocabulary_map: VocabularyMap, several: bool = False) -> None:
        super().__init__()
        if any(s.teacher is not signals[0].teacher for s in signals):
            raise ValueError("signals written in one teacher pass must share one teacher (the same model object)")
        self.signals, self.vocabulary_map, self.several = nn.ModuleList(signals), vocabulary_map, several

    @torch.no_grad()
    def predict_step(self, batch: dict[str, Any], batch_idx: int = 0) -> Any:
        missing = [key for key in (*CROSS_TOKENIZER_KEYS, "input_ids", "index") if key not in batch]
        if missing:
            raise ValueError(
                f"a teacher cache in the student's ids needs cross-tokenizer batches; this one lacks {missing}"
                " (build the data module with teacher_tokenizer=)"
            )
        teacher = self.signals[0].teacher
        logits = teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"]).logits
        logits = logits[..., : self.vocabulary_map.teacher_vocab_size]
        predictions = [signal.mapped_signal_of(logits, batch, self.vocabulary_map) for signal in self.signals]
        return predictions if self.several else predictions[0]
