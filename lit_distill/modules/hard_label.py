"""Hard-label distillation: the student learns the teacher's chosen tokens, not its full distribution."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..kernels import DistillationOutput
from .causal_lm import cross_entropy_output
from .distillation import DistillationModule
from .generation import can_generate, continue_prompts

MODES = ("argmax", "generate")


class HardLabelDistillation(DistillationModule):
    """Train the student with cross-entropy on tokens the teacher picks.

    - ``mode="argmax"``: at every position the target is the teacher's most likely next token, taken from
      the same fused pass that computes the statistics (token-level hard labels). With ``label_weight=w``
      the per-token loss is ``(1 - w) * CE(student, teacher argmax) + w * CE(student, data label)``, both
      cross-entropies from one forward pass of each model and one loss call (the loss's ``label_weight``,
      which this ``label_weight`` sets): ``w=0.5`` is DeiT's hard distillation (Touvron et al., 2021);
      ``w=0``, the default, is the pure form (the teacher's argmax only).
      The logged ``hard`` is that same mix of the two cross-entropies (the training objective per token);
      ``agreement`` and ``teacher_ce`` are as in the pure form.
    - ``mode="generate"``: sequence-level distillation. The first ``prompt_length`` tokens of each sequence
      are a prompt; the teacher generates ``max_new_tokens`` tokens after it (sampling with
      ``sampling_temperature`` and ``top_p``, or greedy with ``do_sample=False``), and the student trains
      on the generated tokens only (the prompt, and anything after the teacher's end-of-sequence token,
      are masked). Prompts must not contain padding.

    Args:
        mode: ``"argmax"`` or ``"generate"``.
        label_weight: weight in [0, 1] of the cross-entropy on the data's labels (argmax mode).
        prompt_length: prompt tokens per sequence (generate mode).
        max_new_tokens: tokens the teacher generates per prompt (generate mode).
        do_sample: sample (True) or decode greedily (False).
        sampling_temperature: the teacher's sampling temperature (not the distillation temperature).
        top_p: nucleus-sampling mass.
        *args, **kwargs: as in :class:`~lit_distill.modules.distillation.DistillationModule`.

    Raises:
        ValueError: for an unknown mode, non-positive lengths, a sampling temperature <= 0, top_p outside
            (0, 1], ``mode="generate"`` with a teacher that cannot generate, a label_weight outside [0, 1],
            or a label_weight > 0 with ``mode="generate"``.
    """

    def __init__(
        self,
        *args: Any,
        mode: str = "argmax",
        label_weight: float = 0.0,
        prompt_length: int = 16,
        max_new_tokens: int = 32,
        do_sample: bool = True,
        sampling_temperature: float = 1.0,
        top_p: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose 'argmax' or 'generate'")
        if not 0 <= label_weight <= 1:
            raise ValueError(
                f"label_weight must lie in [0, 1] (0.5: DeiT's hard distillation, 0: the teacher's argmax only),"
                f" got {label_weight}"
            )
        if label_weight > 0 and mode == "generate":
            raise ValueError(
                f"label_weight={label_weight} needs mode='argmax': the teacher's generated tokens are not aligned"
                " with the data's labels; set label_weight=0 or use mode='argmax'"
            )
        if prompt_length < 1 or max_new_tokens < 1:
            raise ValueError(f"prompt_length and max_new_tokens must be >= 1, got {prompt_length}, {max_new_tokens}")
        if not (sampling_temperature > 0 and math.isfinite(sampling_temperature)):
            raise ValueError(f"sampling_temperature must be > 0, got {sampling_temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        super().__init__(*args, **kwargs)
        # The module's label_weight sets the loss's at every call; a different one on the loss would be ignored.
        if getattr(self.loss, "label_weight", 0.0) not in (0.0, label_weight):
            raise ValueError(
                f"the loss's label_weight ({self.loss.label_weight}) differs from HardLabelDistillation's"
                f" ({label_weight}), which it would override: set label_weight={self.loss.label_weight} on the"
                " module instead"
            )
        if mode == "generate" and not can_generate(self.teacher):
            raise ValueError(
                f"mode='generate' needs a teacher that can generate text (a Hugging Face causal LM with"
                f" .generate); {type(self.teacher).__name__} cannot"
            )
        self.mode = mode
        self.label_weight = label_weight
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.do_sample = do_sample
        self.sampling_temperature = sampling_temperature
        self.top_p = top_p
        if mode == "generate":
            self.logged_statistics = ("hard",)

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> DistillationOutput:
        if self.mode == "argmax":
            return self.argmax_loss(batch)
        sequences, labels = self.generate_targets(batch)
        logits = self.student(input_ids=sequences).logits[:, :-1]
        return cross_entropy_output(logits, labels[:, 1:], self.loss.ignore_index)

    def argmax_loss(self, batch: Mapping[str, torch.Tensor]) -> DistillationOutput:
        """CE on the teacher's argmax, mixed with CE on the data's labels by ``label_weight`` (summed).

        One loss call: the loss's ``label_weight`` mixes both cross-entropies (and their gradients) per token
        from one pass over each model's logits, so the fused-linear path projects each lm_head once.
        """
        passes = self.forward_passes(batch)
        return self.distillation_loss(passes, alpha=0.0, hard_labels="teacher_argmax", label_weight=self.label_weight)

    @torch.no_grad()
    def generate_targets(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt + generated tokens ``(B, P + G)``, labels: generated tokens, ``ignore_index`` elsewhere)."""
        input_ids = self.shifted_inputs(batch)[0]
        if input_ids.shape[1] < self.prompt_length:
            raise ValueError(
                f"sequences of {input_ids.shape[1]} tokens are shorter than prompt_length={self.prompt_length}"
            )
        out = continue_prompts(
            self.teacher,
            input_ids,
            torch.full((input_ids.shape[0],), self.prompt_length, device=input_ids.device),
            max_new_tokens=self.max_new_tokens,
            ignore_index=self.loss.ignore_index,
            do_sample=self.do_sample,
            temperature=self.sampling_temperature,
            top_p=self.top_p,
            synced_gpus=True if self.generates_in_lockstep() else None,
        )
        return out.input_ids, out.labels
