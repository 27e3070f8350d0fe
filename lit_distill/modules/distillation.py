"""The distillation base: a causal-LM module with a teacher, frozen or trained, and the fused loss call."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn
from torchmetrics import MeanMetric
from typing_extensions import override

from ..kernels import DistillationOutput
from ..models import CausalLM, build, fusable_head, vocab_size
from .attention import attention_inputs
from .causal_lm import CausalLMModule
from .normalization import is_deepspeed, is_sharded


class ForwardPasses(NamedTuple):
    """What the student's and the teacher's forward passes give the loss, for positions 0..T-2.

    Attributes:
        student: ``(B, T-1, V)`` logits, or ``(B, T-1, H)`` hidden states when the heads are fused.
        teacher: the same for the teacher (its own width when fused).
        labels: ``(B, T-1)`` next tokens, ``ignore_index`` where not counted.
        student_head: ``(weight, bias)`` of the student's lm_head when fused, else None.
        teacher_head: the same for the teacher.
    """

    student: torch.Tensor
    teacher: torch.Tensor
    labels: torch.Tensor
    student_head: tuple[torch.Tensor, torch.Tensor | None] | None = None
    teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def from_first_counted(self, ignore_index: int) -> ForwardPasses:
        """These passes without the leading positions that no row counts (a prompt common to all rows): the
        loss's sums are the same, its work proportional to what is left. Reads the labels on the host."""
        counted = (self.labels != ignore_index).any(0)
        first = int(counted.int().argmax()) if bool(counted.any()) else 0
        return self._replace(
            student=self.student[:, first:], teacher=self.teacher[:, first:], labels=self.labels[:, first:]
        )


class DistillationModule(CausalLMModule):
    """Student, teacher and loss: teacher freezing, the fused loss call, the teacher in checkpoints.

    Technique modules override :meth:`compute_loss` (default: :meth:`distill`, soft-label distillation). A
    frozen teacher is in eval mode without gradients and is left out of checkpoints (it is rebuilt from its
    source; FSDP keeps it, as a sharded checkpoint must hold every key); a trained one (co-distillation,
    ``teacher_trains``) is a second model like the student.

    Args:
        student: the model to train: a Hugging Face causal LM or a :class:`~lit_distill.models.CausalLM`.
        teacher: the model to learn from (same vocabulary, up to head padding: see ``loss.vocab_size``).
        fused_linear: compute the loss from hidden states and lm_head weights without the full logits,
            where both models allow it (plain linear heads; not heads with soft-capping or logit scaling).
        chunk_size: tokens per chunk of the fused-linear path (None: from a memory budget).
        *args, **kwargs: ``loss``, ``optimizer``, ``lr_scheduler``, ``vocab_size``, ``special_tokens``,
            ``on_nonfinite``, as in :class:`~lit_distill.modules.causal_lm.CausalLMModule`.

    Raises:
        ValueError: when there is no teacher, or the vocabularies differ beyond what ``loss.vocab_size``
            declares as padding, or as :class:`~lit_distill.modules.causal_lm.CausalLMModule` does.
    """

    #: the teacher is trained too (co-distillation); otherwise it is frozen
    teacher_trains: bool = False
    logged_statistics = ("soft", "hard", "teacher_ce", "agreement")

    def __init__(
        self,
        student: nn.Module | CausalLM,
        teacher: nn.Module | CausalLM | None = None,
        *args: Any,
        fused_linear: bool = True,
        chunk_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if teacher is None:
            raise ValueError(f"{type(self).__name__} needs a teacher model (teacher=...)")
        super().__init__(student, *args, **kwargs)
        self.teacher = build(teacher, self.tokenizer_size, self.special_tokens)
        self.fused_linear = fused_linear
        self.chunk_size = chunk_size
        self._check_vocabularies()
        if self.frozen_teacher:
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        self.register_load_state_dict_post_hook(_allow_missing_frozen_teacher)
        self.val_teacher_ce = MeanMetric()

    @property
    def frozen_teacher(self) -> bool:
        """Whether the teacher only gives targets (no gradient, eval mode, not in non-sharded checkpoints)."""
        return not self.teacher_trains

    def _check_vocabularies(self) -> None:
        self.check_tokenizer_fits("teacher", self.teacher, self.tokenizer_size)
        v_s, v_t = vocab_size(self.student), vocab_size(self.teacher)
        declared = self.loss.vocab_size
        if v_s is None or v_t is None:
            return
        if declared is None and v_s != v_t:
            raise ValueError(
                f"the student's vocabulary ({v_s}) differs from the teacher's ({v_t}). Distillation needs one"
                " tokenizer; if one head is only padded, set the loss's vocab_size to the tokenizer's size"
            )
        if declared is not None and declared > min(v_s, v_t):
            raise ValueError(
                f"loss vocab_size={declared} exceeds the student's ({v_s}) or the teacher's ({v_t}) vocabulary"
            )

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.frozen_teacher:
            # Lightning warns at every fit that modules are in eval mode: a frozen teacher is, on purpose.
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", module="lightning")
        datamodule = getattr(self.trainer, "datamodule", None)
        self.check_data_tokenizer(datamodule)
        if getattr(datamodule, "packing", False) and self.generates_from_prompts():
            raise ValueError(
                f"{type(self).__name__} continues prompts, and packed rows (packing=True) hold several"
                " conversations and no prompt_mask: use the data module with packing=False"
            )

    def check_data_tokenizer(self, datamodule: Any) -> None:
        """The data's tokenizer must be the one saved with the teacher (one tokenizer on both sides)."""
        tokenizer = getattr(datamodule, "tokenizer", None)
        if tokenizer is not None:
            from ..data import check_tokenizer

            check_tokenizer(self.teacher, tokenizer)

    def generates_from_prompts(self) -> bool:
        """Whether training continues the batches' prompts (on-policy distillation, hard labels by generation)."""
        return callable(getattr(self, "generate", None)) or getattr(self, "mode", None) == "generate"

    @override
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.frozen_teacher:
            self.teacher.eval()  # a frozen teacher never runs dropout
        return self

    # ------------------------------------------------------------- the loss
    @override
    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> DistillationOutput:
        return self.distill(batch)

    def distill(self, batch: Mapping[str, torch.Tensor], **overrides: Any) -> DistillationOutput:
        """Both forward passes and the distillation loss (sum over counted tokens); ``overrides`` go to the loss."""
        return self.distillation_loss(self.forward_passes(batch), **overrides)

    def forward_passes(self, batch: Mapping[str, torch.Tensor]) -> ForwardPasses:
        """Both models' forward passes on ``batch``, for one or more :meth:`distillation_loss` calls."""
        input_ids, attention_mask, labels = self.shifted_inputs(batch)
        position_ids = batch.get("position_ids")  # packed rows: each model gets them and its block-diagonal mask
        heads = self.fused_heads()
        with torch.set_grad_enabled(self.teacher_trains and torch.is_grad_enabled()):
            teacher_out = _forward(self.teacher, heads[1], input_ids, attention_mask, position_ids)
        student_out = _forward(self.student, heads[0], input_ids, attention_mask, position_ids)
        if heads[0] is None:
            return ForwardPasses(_logits(student_out)[:, :-1], _logits(teacher_out)[:, :-1], labels)
        (h_s, w_s, b_s), (h_t, w_t, b_t) = student_out, teacher_out
        return ForwardPasses(h_s[:, :-1], h_t[:, :-1], labels, (w_s, b_s), (w_t, b_t))

    def distillation_loss(self, passes: ForwardPasses, **overrides: Any) -> DistillationOutput:
        """The loss (sum over counted tokens) on :meth:`forward_passes`' outputs; ``overrides`` go to the loss."""
        overrides = {"reduction": "sum", **overrides}
        if passes.student_head is None:
            return self.loss(passes.student, passes.teacher, passes.labels, **overrides)
        (w_s, b_s), (w_t, b_t) = passes.student_head, passes.teacher_head
        return self.loss.fused_linear(
            passes.student,
            w_s,
            passes.teacher,
            w_t,
            passes.labels,
            student_bias=b_s,
            teacher_bias=b_t,
            chunk_size=self.chunk_size,
            **overrides,
        )

    def fused_heads(self) -> tuple[nn.Linear | None, nn.Linear | None]:
        """The (student, teacher) lm_heads the loss reads directly: both or neither (one fused side would leave
        the other's logits unmatched), and neither with ``fused_linear=False``."""
        heads = (fusable_head(self.student), fusable_head(self.teacher))
        return heads if self.fused_linear and None not in heads else (None, None)

    def generates_in_lockstep(self) -> bool:
        """Whether ``generate`` must keep all processes decoding until the last stops (ZeRO-3 gathers each
        layer's weights from all of them; Hugging Face does this by itself under FSDP, not under DeepSpeed)."""
        return is_deepspeed(self._trainer) and self.trainer.world_size > 1

    # ----------------------------------------------------------- validation
    @override
    def validation_output(self, batch: Mapping[str, torch.Tensor]) -> DistillationOutput:
        out = self.distill(batch, hard_labels="labels")  # cross-entropies on the true next tokens
        self.val_teacher_ce.update(out.teacher_ce, weight=out.num_tokens.clamp(min=1).float())
        return out

    @override
    def on_validation_epoch_end(self) -> None:
        teacher_ce = self.val_teacher_ce.compute()
        self.log("val/teacher_ce", teacher_ce)
        self.log("val/teacher_ppl", torch.exp(teacher_ce))
        self.val_teacher_ce.reset()
        super().on_validation_epoch_end()

    # ---------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.frozen_teacher and not is_sharded(self._trainer):
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")
            }

    def save_teacher(self, directory: str) -> None:
        """Write the teacher in Hugging Face format (every process calls it, as ``save_student``)."""
        self._save_pretrained("teacher", directory)


def _allow_missing_frozen_teacher(module: DistillationModule, incompatible_keys: Any) -> None:
    """``load_state_dict`` hook: a frozen teacher may be missing (it keeps its weights), even when loading strictly."""
    if module.frozen_teacher:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not k.startswith("teacher.")]


def _forward(
    model: nn.Module,
    head: nn.Linear | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
):
    """(hidden states, head weight, head bias) for a fused head, else the model's output; with ``position_ids``
    (packed rows) the model gets them and the block-diagonal causal mask (:func:`attention_inputs`)."""
    masks = attention_inputs(model, attention_mask, position_ids)
    if head is None:
        return model(input_ids=input_ids, **masks)
    hidden = model.base_model(input_ids=input_ids, **masks).last_hidden_state
    return hidden, head.weight, head.bias


def _logits(output: Any) -> torch.Tensor:
    """A Hugging Face output's ``.logits``, or the output itself for models that return the logits tensor."""
    return output.logits if hasattr(output, "logits") else output
