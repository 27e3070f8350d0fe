"""Cross-tokenizer distillation: a teacher with another tokenizer, aligned on bytes (``data/cross_tokenizer``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from ..data.cross_tokenizer.fused import fusable, fused_cross_tokenizer_loss
from ..data.cross_tokenizer.loss import KEYWORDS, CrossTokenizerOutput, Pairs, cross_tokenizer_loss
from ..data.cross_tokenizer.token_bytes import byte_lengths
from ..data.cross_tokenizer.vocab_map import VocabularyMap, build_vocabulary_map
from ..data.tokenizers import load_tokenizer, special_token_ids, tokenizer_hash
from ..models import CausalLM, build, fusable_head, vocab_size
from .attention import attention_inputs
from .causal_lm import CausalLMModule
from .distillation import DistillationModule, _logits

#: the keys a cross-tokenizer batch adds to the student's (``CrossTokenizerCollator``)
BATCH_KEYS = ("teacher_input_ids", "boundary_student", "boundary_teacher", "student_chunk", "teacher_chunk")


class CrossTokenizerDistillation(DistillationModule):
    """Distil a teacher whose tokenizer differs from the student's.

    The data module is given both tokenizers (``tokenizer`` the student's, ``teacher_tokenizer`` the teacher's); its
    loader workers tokenize each row for the teacher too and align the two on bytes. The loss
    (:func:`~lit_distill.data.cross_tokenizer.loss.cross_tokenizer_loss`) is
    ``alpha * (boundary_weight * KD + chunk_weight * chunk + uld_weight * ULD) + (1 - alpha) * CE`` over the
    student's counted tokens (a token with no pair keeps its whole CE): KD where both models have read the same
    bytes (the teacher's distribution binned into the student's vocabulary by the
    :class:`~lit_distill.data.cross_tokenizer.VocabularyMap`, its ``top_k`` likeliest tokens and a tail bucket), the
    likelihoods of the text between those points (ALM-style), and ULD's sorted probabilities. Divergence,
    temperature and alpha come from ``loss`` and can be scheduled as elsewhere.

    Args:
        student: the model to train (its vocabulary is the student tokenizer's).
        teacher: the frozen teacher (its vocabulary is the teacher tokenizer's; its head may be wider).
        student_tokenizer: the student's tokenizer (a Hub name, a directory, or a tokenizer).
        teacher_tokenizer: the teacher's, likewise.
        top_k: binned slots of the boundary term (plus a tail bucket), or None for the whole binned distribution.
        boundary_weight, chunk_weight, uld_weight: the three terms' weights inside ``alpha``.
        uld_top_k: probabilities ULD compares per side.
        cache_dir: where the vocabulary map is cached (default: the library's cache directory).
        *args, **kwargs: ``loss``, ``optimizer``, ``fused_linear``, ``chunk_size``, ... as in
            :class:`DistillationModule`. ``fused_linear`` (the default) trains from the student's hidden states and
            head without its whole logits when the loss is the boundary term alone with ``top_k`` slots (no chunk
            or ULD term, ``boundary_weight`` 1; ``fused.py``); otherwise, and in validation, the logits are whole.

    Raises:
        ValueError: for a loss this module cannot compute (teacher-argmax hard labels, a teacher cross-entropy
            weight), a teacher smaller than its tokenizer, or (at setup) data of other tokenizers.

    Example:
        >>> module = CrossTokenizerDistillation(student, teacher, "path/to/student", "path/to/teacher")
        >>> Trainer(max_steps=1000).fit(module, TextDataModule(tokenizer="path/to/student",
        ...                                                     teacher_tokenizer="path/to/teacher"))
    """

    logged_statistics = ("soft", "hard", "agreement", "chunk", "uld", "boundary_share")

    def __init__(
        self,
        student: nn.Module | CausalLM,
        teacher: nn.Module | CausalLM,
        student_tokenizer: Any,
        teacher_tokenizer: Any,
        *args: Any,
        top_k: int | None = 64,
        boundary_weight: float = 1.0,
        chunk_weight: float = 0.0,
        uld_weight: float = 0.0,
        uld_top_k: int = 64,
        cache_dir: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.student_tokenizer = _tokenizer(student_tokenizer)
        self.teacher_tokenizer = _tokenizer(teacher_tokenizer)
        kwargs.setdefault("vocab_size", len(self.student_tokenizer))
        kwargs.setdefault("special_tokens", special_token_ids(self.student_tokenizer))
        teacher = build(teacher, len(self.teacher_tokenizer), special_token_ids(self.teacher_tokenizer))
        super().__init__(student, teacher, *args, **kwargs)
        self.cross_options = dict(
            top_k=top_k, boundary_weight=boundary_weight, chunk_weight=chunk_weight, uld_weight=uld_weight,
            uld_top_k=uld_top_k,
        )  # fmt: skip
        if self.loss.hard_labels != "labels" or self.loss.teacher_ce_weight > 0:
            raise ValueError(
                "CrossTokenizerDistillation trains on the student's own labels with a frozen teacher: the loss needs"
                " hard_labels='labels' and teacher_ce_weight=0"
            )
        self.vocab_map: VocabularyMap = build_vocabulary_map(
            self.teacher_tokenizer, self.student_tokenizer, vocab_size(self.teacher), cache_dir
        )

    @override
    def _check_vocabularies(self) -> None:
        self.check_tokenizer_fits("student", self.student, len(self.student_tokenizer))
        self.check_tokenizer_fits("teacher", self.teacher, len(self.teacher_tokenizer))

    @override
    def check_data_tokenizer(self, datamodule: Any) -> None:
        for side, mine in (("tokenizer", self.student_tokenizer), ("teacher_tokenizer", self.teacher_tokenizer)):
            theirs = getattr(datamodule, side, None)
            if theirs is not None and tokenizer_hash(theirs) != tokenizer_hash(mine):
                who = "student" if side == "tokenizer" else "teacher"
                raise ValueError(
                    f"the data's {side} ({_name(theirs)}) is not the module's {who}_tokenizer ({_name(mine)}): give"
                    f" the data module the {who}'s tokenizer as {side}="
                )

    @override
    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> CrossTokenizerOutput:
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs cross-tokenizer batches; this one lacks {missing}: give the data"
                " module teacher_tokenizer= (its loader then tokenizes each row for the teacher and aligns them)"
            )
        if batch.get("position_ids") is not None:
            raise ValueError("packed rows (position_ids) cannot be aligned across tokenizers: use packing=False")
        input_ids, attention_mask, labels = self.shifted_inputs(batch)
        teacher_ids, teacher_mask = batch["teacher_input_ids"], batch.get("teacher_attention_mask")
        with torch.no_grad():
            # every position: a pair may sit on a teacher row's last token (the student row goes on past it)
            teacher_logits = _logits(self.teacher(input_ids=teacher_ids, attention_mask=teacher_mask))
        masks = attention_inputs(self.student, attention_mask, None)
        keywords = {name: getattr(self.loss, name) for name in KEYWORDS}
        common = dict(byte_lengths=self.token_byte_lengths(input_ids.device))
        head = self._fused_head()
        if head is not None:  # the student's logits a chunk at a time (validation keeps the teacher's statistics)
            hidden = self.student.base_model(input_ids=input_ids, **masks).last_hidden_state[:, :-1]
            options = {k: v for k, v in self.cross_options.items() if k in ("top_k", "unpaired_labels")}
            return fused_cross_tokenizer_loss(
                hidden, head.weight, head.bias, teacher_logits, labels, _next_tokens(teacher_ids), Pairs.of(batch),
                self.vocab_map, chunk_size=self.chunk_size, **common, **options, **keywords,
            )  # fmt: skip
        student_logits = _logits(self.student(input_ids=input_ids, **masks))[:, :-1]
        return cross_tokenizer_loss(
            student_logits, teacher_logits, labels, _next_tokens(teacher_ids), Pairs.of(batch), self.vocab_map,
            reduction="sum", teacher_ce=not self.training, **common, **self.cross_options, **keywords,
        )  # fmt: skip

    def _fused_head(self) -> nn.Linear | None:
        """The student's head for the fused-linear path: in training, with ``fused_linear``, a plain linear head, and
        a loss that is one sparse term (``top_k`` set, no chunk or ULD term, boundary weight 1)."""
        if not (self.fused_linear and self.training and fusable(self.cross_options)):
            return None
        return fusable_head(self.student)

    def token_byte_lengths(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(student, teacher) bytes of each token id, on ``device`` (read from the tokenizers once)."""
        if getattr(self, "_byte_lengths", None) is None or self._byte_lengths[0].device != device:
            tables = (byte_lengths(self.student_tokenizer), byte_lengths(self.teacher_tokenizer))
            self._byte_lengths = tuple(torch.tensor(t.tolist(), dtype=torch.long, device=device) for t in tables)
        return self._byte_lengths

    @override
    def validation_output(self, batch: Mapping[str, torch.Tensor]) -> CrossTokenizerOutput:
        out = self.compute_loss(batch)
        if bool(torch.isfinite(out.teacher_ce)):  # the teacher's cross-entropy on the counted chunks' tokens
            self.val_teacher_ce.update(out.teacher_ce, weight=out.boundaries.clamp(min=1).float())
        return out

    @override
    def on_validation_epoch_end(self) -> None:
        if self.val_teacher_ce.update_count:  # per teacher token: not comparable with the student's per-token CE
            teacher_ce = self.val_teacher_ce.compute()
            self.log("val/teacher_ce", teacher_ce)
            self.log("val/teacher_ppl", torch.exp(teacher_ce))
        self.val_teacher_ce.reset()
        CausalLMModule.on_validation_epoch_end(self)


def _next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` each position's next token, 0 after the last (no chunk reads it)."""
    return torch.nn.functional.pad(ids[:, 1:], (0, 1))


def _tokenizer(tokenizer: Any):
    return load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer


def _name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
