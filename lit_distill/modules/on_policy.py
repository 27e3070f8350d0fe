"""On-policy distillation: the student learns on sequences it generated itself, scored by the teacher."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from ..kernels import DistillationOutput
from ..losses import DistillationLoss
from ..models import CausalLM
from .distillation import DistillationModule
from .generation import (
    can_generate,
    continue_prompts,
    derived_seed,
    is_prompt_only,
    prompt_lengths_of,
    prompts_as_prefixes,
    stop_ids_of,
)
from .sampled_token import counted_logits, sampled_token_reverse_kl

ESTIMATORS = ("full", "sampled_token")
MIXES = ("either", "both")


class OnPolicyDistillation(DistillationModule):
    """GKD-style distillation that mixes the student's own samples with the data's sequences.

    Every training micro-batch is on-policy with probability ``lmbda`` (drawn from ``seed``, the optimizer
    step and the micro-batch's place in it: every process draws the same, and a resumed run draws again what
    the uninterrupted one drew), otherwise off-policy: soft-label distillation on the batch's own tokens,
    with the loss as configured.

    On-policy, the student continues each prompt (the first ``prompt_length`` tokens of each sequence, or
    the tokens a ``prompt_mask`` in the batch marks, a prefix of each row, for chat-style data) by
    ``max_new_tokens`` tokens with Hugging Face ``generate`` under ``no_grad``, in eval mode, with the KV
    cache. Each process samples its own (seeded by the same draw and its rank). Only the generated tokens
    count, the first stop token included (as TRL's GKD): the prompt, the padding and what follows it do not.
    A prompt-only batch (``PromptDataModule``'s: left-padded, its ``prompt_mask`` equal to its
    ``attention_mask``) is continued from each whole prompt; it has no completion, so every batch must be
    on-policy (``lmbda=1``, ``mix="either"``), and its validation loss is the divergence on the prompts. Then:

    - ``estimator="full"``: both models score prompt + continuation, and the loss's divergence is computed
      over the whole vocabulary at every generated position by the fused kernels (from hidden states and
      head weights where both heads are plain linear layers). The student's own tokens are not labels to
      learn, so on-policy batches use the divergence alone (``alpha`` = 1); ``alpha`` applies to the
      off-policy batches.
    - ``estimator="sampled_token"``: only the two models' log-probabilities of the sampled tokens are read.
      The per-token reverse-KL estimate ``log q - log p`` (detached) weighs ``log q``: its gradient is, in
      expectation over the student's samples, the gradient of the reverse KL at each position (exactly so
      when ``sampling_temperature`` equals the loss's temperature and ``top_p`` is 1). The loss's value is
      the estimate itself. Needs ``divergence="reverse_kl"`` (of ``on_policy_loss`` when given). Off-policy
      batches, whose tokens are not the student's samples, use ``loss`` over the whole vocabulary.

    ``on_policy_loss`` gives the on-policy batches a loss of their own (e.g. forward KL on the data, reverse
    KL on the student's samples); schedules (``AlphaScheduler``, ...) set ``loss`` only. With ``mix="both"``
    an on-policy micro-batch keeps the off-policy loss on its own data tokens too, as MiniLLM keeps a
    language-modeling loss on data beside its on-policy term: the loss is the off-policy token mean plus the
    on-policy token mean (each micro-batch's, counted as its data tokens), at the cost of both passes, and
    the logged statistics are the off-policy ones.

    Args:
        student, teacher: as in :class:`~lit_distill.modules.distillation.DistillationModule`; the student
            must be able to generate when ``lmbda > 0``.
        loss: the divergence, temperature and alpha; default ``DistillationLoss(divergence="jsd", beta=0.5)``,
            GKD's generalized JSD at TRL's default beta: bounded, and halfway between forward KL's
            mode-covering and reverse KL's mode-seeking.
        on_policy_loss: the loss of the on-policy batches (default: ``loss``; its ``alpha`` is ignored).
        lmbda: probability that a micro-batch is on-policy (GKD's λ), in [0, 1].
        prompt_length: prompt tokens per sequence (when the batch has no ``prompt_mask``); must be shorter than
            the sequences.
        max_new_tokens: tokens the student generates per prompt.
        sampling_temperature: the student's sampling temperature (not the distillation temperature).
        top_p: the student's nucleus-sampling mass.
        do_sample: sample (True) or decode greedily (False: a deterministic on-policy batch, for tests).
        estimator: ``"full"`` or ``"sampled_token"``.
        seed: seeds the λ draws and the samples.
        mix: ``"either"`` (GKD: a micro-batch is on-policy or off-policy) or ``"both"`` (see above).
        stop_token_ids: the ids that end a reply (EOS, the template's end of turn: ``PromptDataModule``'s
            ``stop_token_ids``); None: the student's generation config's EOS ids and ``special_tokens``' EOS.
        *args, **kwargs: ``optimizer``, ``fused_linear``, ... as in
            :class:`~lit_distill.modules.distillation.DistillationModule`.

    Logged every step: ``train/on_policy_fraction`` (on-policy micro-batches so far, over all), and on
    on-policy batches ``train/generated_tokens_per_sec``, ``train/mean_generated_length``; after every batch
    ``train/generation_time_fraction`` (the share of this run's training-batch time spent generating).

    Raises:
        ValueError: for ``lmbda`` outside [0, 1], ``prompt_length`` or ``max_new_tokens`` below 1, a sampling
            temperature <= 0, ``top_p`` outside (0, 1], an unknown estimator, ``"sampled_token"`` with a
            divergence other than reverse KL, a student that cannot generate, and (at the first batch)
            prompts that are not shorter than the sequences, or prompt-only batches with ``lmbda < 1``.
    """

    def __init__(
        self,
        student: nn.Module | CausalLM,
        teacher: nn.Module | CausalLM | None = None,
        loss: DistillationLoss | None = None,
        *args: Any,
        on_policy_loss: DistillationLoss | None = None,
        lmbda: float = 1.0,
        prompt_length: int = 16,
        max_new_tokens: int = 32,
        sampling_temperature: float = 1.0,
        top_p: float = 1.0,
        do_sample: bool = True,
        estimator: str = "full",
        seed: int = 0,
        mix: str = "either",
        stop_token_ids: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        _check_options(lmbda, prompt_length, max_new_tokens, sampling_temperature, top_p, estimator)
        if mix not in MIXES:
            raise ValueError(f"unknown mix {mix!r}; choose 'either' (GKD) or 'both'")
        loss = loss if loss is not None else DistillationLoss(divergence="jsd", beta=0.5)
        sampled_loss = on_policy_loss if on_policy_loss is not None else loss
        if estimator == "sampled_token" and sampled_loss.divergence != "reverse_kl":
            raise ValueError(
                f"estimator='sampled_token' estimates the reverse KL from the sampled tokens alone; it cannot"
                f" estimate divergence={sampled_loss.divergence!r}. Use divergence='reverse_kl', or estimator='full'"
            )
        super().__init__(student, teacher, loss, *args, **kwargs)
        self.on_policy_loss = on_policy_loss
        if lmbda > 0 and not can_generate(self.student):
            raise ValueError(
                f"on-policy distillation needs a student that can generate text (a Hugging Face causal LM with"
                f" .generate); {type(self.student).__name__} cannot. Use lmbda=0 for off-policy batches only"
            )
        self.lmbda, self.prompt_length, self.max_new_tokens = lmbda, prompt_length, max_new_tokens
        self.sampling_temperature, self.top_p, self.do_sample = sampling_temperature, top_p, do_sample
        self.estimator, self.seed, self.mix = estimator, seed, mix
        self.stop_token_ids = list(stop_token_ids) if stop_token_ids else None
        self.counts = {"batches": 0, "on_policy": 0, "generation_s": 0.0, "batch_s": 0.0}
        self._batch_start = 0.0
        self._draw = 0

    # -------------------------------------------------------- the λ draw
    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The optimizer step and the micro-batch's place in it: the same on every process and after a resume.
        micro = batch_idx % self.trainer.accumulate_grad_batches
        self._draw = derived_seed(self.seed, self.trainer.global_step, micro)
        self.counts["batches"] += 1
        self.counts["on_policy"] += int(self.is_on_policy())
        self._log("train/on_policy_fraction", self.counts["on_policy"] / self.counts["batches"])
        self._batch_start = _now(self.device)

    def is_on_policy(self) -> bool:
        """Whether the current micro-batch is on-policy (a function of the seed and its place in the run)."""
        if self.lmbda in (0.0, 1.0):
            return self.lmbda == 1.0
        generator = torch.Generator().manual_seed(self._draw)
        return bool(torch.rand((), generator=generator) < self.lmbda)

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.counts["batch_s"] += _now(self.device) - self._batch_start
        fraction = self.counts["generation_s"] / max(self.counts["batch_s"], 1e-9)
        self._log("train/generation_time_fraction", fraction)

    def _log(self, name: str, value: float) -> None:
        if self._trainer is not None and self.trainer.training:  # compute_loss also runs outside training
            self.log(name, value, on_step=True, on_epoch=False)

    # ------------------------------------------------------------ the loss
    @override
    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> DistillationOutput:
        if is_prompt_only(batch) and (self.lmbda < 1 or self.mix != "either"):
            raise ValueError(
                f"prompt-only batches have no completion to distill on off-policy, so every batch is on-policy: got"
                f" lmbda={self.lmbda}, mix={self.mix!r}; use lmbda=1 and mix='either' (or ChatDataModule data)"
            )
        if not self.is_on_policy():  # the data's tokens, not the student's samples: the loss as configured
            return self.distill(batch)
        generated = self.generate(batch)
        loss = self.on_policy_loss if self.on_policy_loss is not None else self.loss
        if self.estimator == "full":  # the student's own tokens are not labels to learn: alpha = 1
            # The loss skips the prompt positions (none counts): half the work for a prompt of half the text.
            passes = self.forward_passes(generated).from_first_counted(self.loss.ignore_index)
            on = self.distillation_loss(passes, **{**loss.options(), "alpha": 1.0, "reduction": "sum"})
        else:
            on = self.sampled_token_loss(generated, loss)
        if self.mix == "either":
            return on
        off = self.distill(batch)
        # The on-policy sum as its token mean, counted as the data's tokens (the normalizer divides by them).
        return off._replace(loss=off.loss + on.loss * (off.num_tokens / on.num_tokens.clamp(min=1)))

    def generate(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The student's continuations of the batch's prompts, as a batch whose labels are the generated tokens."""
        if is_prompt_only(batch):  # left-padded whole prompts: each row's prompt becomes a prefix
            batch = prompts_as_prefixes(batch)
            input_ids, lengths = batch["input_ids"], batch["attention_mask"].sum(1).clamp(min=1)
        else:
            input_ids, lengths = self.shifted_inputs(batch)[0], self.prompt_lengths(batch)
        start = _now(self.device)
        out = continue_prompts(
            self.student,
            input_ids,
            lengths,
            max_new_tokens=self.max_new_tokens,
            ignore_index=self.loss.ignore_index,
            do_sample=self.do_sample,
            temperature=self.sampling_temperature,
            top_p=self.top_p,
            seed=derived_seed(self.seed, self._draw, self.global_rank),  # each process samples its own
            synced_gpus=True if self.generates_in_lockstep() else None,
            stop_token_ids=self.stop_ids(),
        )
        seconds = max(_now(self.device) - start, 1e-9)
        self.counts["generation_s"] += seconds
        tokens = out.generated_tokens.sum().item()
        self._log("train/generated_tokens_per_sec", tokens / seconds)
        self._log("train/mean_generated_length", tokens / len(lengths))
        labels = out.labels
        if batch.get("attention_mask") is not None:  # an all-padding row has no prompt: nothing it generates counts
            labels = labels.masked_fill(~batch["attention_mask"].bool().any(1, keepdim=True), self.loss.ignore_index)
        return {"input_ids": out.input_ids, "attention_mask": out.attention_mask, "labels": labels}

    def stop_ids(self) -> list[int]:
        """The ids that end a reply: ``stop_token_ids``, else the student's EOS ids and ``special_tokens``' EOS."""
        return stop_ids_of(self.student, self.stop_token_ids, (self.special_tokens or {}).get("eos_token_id"))

    @override
    def validation_output(self, batch: Mapping[str, torch.Tensor]) -> DistillationOutput:
        # A prompt-only batch: the divergence on the prompts, each row at its natural positions.
        return super().validation_output(prompts_as_prefixes(batch) if is_prompt_only(batch) else batch)

    def prompt_lengths(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B,)`` prompt tokens per row: ``prompt_length``, or what the batch's ``prompt_mask`` marks."""
        input_ids = batch["input_ids"]
        length = input_ids.shape[1]
        if "prompt_mask" in batch:
            lengths = batch["prompt_mask"].sum(1)
            if bool((lengths < 1).any() | (lengths >= length).any()):
                raise ValueError(
                    f"every row's prompt_mask must mark between 1 and {length - 1} tokens (the sequences have"
                    f" {length}); got {lengths.tolist()}"
                )
            return lengths
        if self.prompt_length >= length:
            raise ValueError(
                f"prompt_length={self.prompt_length} is not shorter than the sequences ({length} tokens): nothing"
                " of them would be left to compare with; use a shorter prompt_length"
            )
        return prompt_lengths_of(input_ids, self.prompt_length, batch.get("attention_mask"))

    def sampled_token_loss(self, batch: Mapping[str, torch.Tensor], loss: DistillationLoss) -> DistillationOutput:
        """The policy-gradient form of the reverse KL on the batch's label tokens (summed over counted tokens)."""
        input_ids, attention_mask, labels = self.shifted_inputs(batch)
        counted = labels != self.loss.ignore_index
        heads = self.fused_heads()
        with torch.no_grad():
            teacher = counted_logits(self.teacher, heads[1], input_ids, attention_mask, counted)
        student = counted_logits(self.student, heads[0], input_ids, attention_mask, counted)
        return sampled_token_reverse_kl(student, teacher, labels[counted], loss)

    # --------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["on_policy_counts"] = dict(self.counts)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.counts.update(checkpoint.get("on_policy_counts", {}))


def _check_options(
    lmbda: float, prompt_length: int, max_new_tokens: int, sampling_temperature: float, top_p: float, estimator: str
) -> None:
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda is the probability that a batch is on-policy; it must lie in [0, 1], got {lmbda}")
    if prompt_length < 1:
        raise ValueError(f"prompt_length must be >= 1, got {prompt_length}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not (sampling_temperature > 0 and math.isfinite(sampling_temperature)):
        raise ValueError(f"sampling_temperature must be > 0, got {sampling_temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose 'full' or 'sampled_token'")


def _now(device: torch.device) -> float:
    """The host clock after the device's queued work (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
