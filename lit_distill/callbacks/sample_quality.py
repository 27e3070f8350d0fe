"""How good the student's own text is by the teacher's measure: an opt-in validation pass on its samples."""

from __future__ import annotations

from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from ..kernels import distillation_loss
from ..models import CausalLM
from ..modules.generation import continue_prompts, derived_seed, is_prompt_only, prompt_lengths_of, prompts_as_prefixes


class SampleScores(NamedTuple):
    """Sums over the generated tokens of a batch of the student's continuations (see :func:`score_samples`)."""

    teacher_nll: torch.Tensor
    reverse_kl: torch.Tensor
    tokens: torch.Tensor


@torch.no_grad()
def score_samples(
    student: nn.Module,
    teacher: nn.Module,
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    *,
    max_new_tokens: int,
    seed: int,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    synced_gpus: bool | None = None,
    stop_token_ids: list[int] | None = None,
) -> SampleScores:
    """The student continues the prompts (sampling, seeded); the teacher scores every generated token.

    Returns the sums over generated tokens of the teacher's negative log-likelihood of the student's token and
    of the reverse KL ``KL(q_student ‖ p_teacher)`` over the whole vocabulary at T=1, and the token count.
    ``stop_token_ids`` end a reply (None: the student's generation config's EOS ids).
    """
    out = continue_prompts(
        student, input_ids, prompt_lengths, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
        synced_gpus=synced_gpus, stop_token_ids=stop_token_ids,
    )  # fmt: skip
    ids, mask = out.input_ids, out.attention_mask
    student_logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1]
    teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    scored = distillation_loss(
        student_logits, teacher_logits, out.labels[:, 1:], divergence="reverse_kl", vocab_size=vocab_size
    )
    tokens = scored.num_tokens
    return SampleScores(scored.teacher_ce * tokens, scored.soft * tokens, tokens)


class OnPolicyEvaluation(Callback):
    """Log ``val/teacher_nll_of_student`` and ``val/student_reverse_kl`` at every validation.

    The student continues the first ``prompt_length`` tokens of the first ``max_batches`` validation batches
    by ``max_new_tokens`` sampled tokens (seeded by ``seed`` and the batch: the same draws at every validation,
    apart from what the weights change), and the teacher scores them: the teacher's mean negative
    log-likelihood of the student's tokens (how plausible the student's own text is to the teacher) and the
    mean reverse KL over the vocabulary at those positions (how far the student's distribution is from the
    teacher's where the student actually goes). Validation on the data's tokens cannot show either: it
    measures the student on states it never reaches on its own. Works with every distillation module; one
    without a teacher in memory (``OfflineDistillation``) needs ``teacher``. Prompt-only validation batches
    (``PromptDataModule``'s) are continued from each whole prompt (``prompt_length`` does not apply), and
    replies stop at the module's ``stop_ids()`` when it has them (``OnPolicyDistillation``).

    Args:
        prompt_length: prompt tokens taken from each validation sequence (shorter than the sequences).
        max_new_tokens: tokens the student generates per prompt.
        max_batches: validation batches to continue (each process its own), the first ones.
        sampling_temperature: the student's sampling temperature.
        seed: seeds the samples.
        teacher: the scoring model when the module has none (a model or a ``CausalLM`` spec); otherwise the
            module's teacher.

    Raises:
        ValueError: when there is no teacher, or ``prompt_length`` is not shorter than the sequences.

    Example:
        >>> Trainer(callbacks=[OnPolicyEvaluation(prompt_length=32, max_new_tokens=32)])
    """

    def __init__(
        self,
        prompt_length: int = 32,
        max_new_tokens: int = 32,
        max_batches: int = 4,
        sampling_temperature: float = 1.0,
        seed: int = 0,
        teacher: nn.Module | CausalLM | None = None,
    ) -> None:
        if prompt_length < 1 or max_new_tokens < 1 or max_batches < 1:
            raise ValueError(
                f"prompt_length, max_new_tokens and max_batches must be >= 1, got {prompt_length},"
                f" {max_new_tokens}, {max_batches}"
            )
        if not sampling_temperature > 0:
            raise ValueError(f"sampling_temperature must be > 0, got {sampling_temperature}")
        self.prompt_length, self.max_new_tokens, self.max_batches = prompt_length, max_new_tokens, max_batches
        self.sampling_temperature, self.seed = sampling_temperature, seed
        self.teacher_source = teacher
        self.teacher: nn.Module | None = None
        self._sums: list[torch.Tensor] = []

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.teacher_source is None:
            self.teacher = getattr(pl_module, "teacher", None)
            if self.teacher is None:
                raise ValueError(
                    f"OnPolicyEvaluation scores the student's samples with a teacher, and {type(pl_module).__name__}"
                    " has none in memory: pass one (OnPolicyEvaluation(teacher=...))"
                )
            return
        from ..models import build

        tokens = getattr(pl_module, "tokenizer_size", None)
        teacher = build(self.teacher_source, tokens, getattr(pl_module, "special_tokens", None))
        self.teacher = teacher.eval().requires_grad_(False)

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher_source is not None:  # our own teacher follows the module (moved after setup)
            self.teacher.to(pl_module.device)
        self._sums = [torch.zeros((), dtype=torch.float64, device=pl_module.device) for _ in range(3)]

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if trainer.sanity_checking or batch_idx >= self.max_batches:
            return
        input_ids, lengths = self.prompts(batch)
        lockstep = getattr(pl_module, "generates_in_lockstep", lambda: False)()
        stops = getattr(pl_module, "stop_ids", None)
        scores = score_samples(
            pl_module.student,
            self.teacher,
            input_ids,
            lengths,
            max_new_tokens=self.max_new_tokens,
            seed=derived_seed(self.seed, batch_idx, trainer.global_rank),
            temperature=self.sampling_temperature,
            vocab_size=getattr(getattr(pl_module, "loss", None), "vocab_size", None),
            synced_gpus=True if lockstep else None,
            stop_token_ids=stops() if callable(stops) else None,
        )
        for total, value in zip(self._sums, scores, strict=True):
            total += value.double()

    def prompts(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, (B,) prompt lengths)``: a prompt-only batch's whole prompts (moved to the start of each
        row), else each sequence's first ``prompt_length`` tokens."""
        if is_prompt_only(batch):
            batch = prompts_as_prefixes(batch)
            return batch["input_ids"], batch["attention_mask"].sum(1).clamp(min=1)
        input_ids = batch["input_ids"]
        if self.prompt_length >= input_ids.shape[1]:
            raise ValueError(
                f"OnPolicyEvaluation's prompt_length={self.prompt_length} is not shorter than the validation"
                f" sequences ({input_ids.shape[1]} tokens); use a shorter prompt_length"
            )
        return input_ids, prompt_lengths_of(input_ids, self.prompt_length, batch.get("attention_mask"))

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not self._sums:
            return
        nll, reverse_kl, tokens = (trainer.strategy.reduce(s, reduce_op="sum") for s in self._sums)
        if float(tokens) == 0:
            return
        pl_module.log("val/teacher_nll_of_student", (nll / tokens).float())
        pl_module.log("val/student_reverse_kl", (reverse_kl / tokens).float())
