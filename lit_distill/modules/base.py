"""The LightningModule every distillation technique builds on.

Loss normalization: each micro-batch's loss is a *sum* over its counted tokens, divided by a constant ``c``
(the number of label positions of the step's first micro-batch, only to keep magnitudes near 1). Lightning
divides every micro-batch's loss by ``accumulate_grad_batches`` (k) and DDP averages gradients over the W
processes, so before the optimizer step the gradient is ``sum_i g_i / (c k W)``. ``on_before_optimizer_step``
then multiplies it by ``c k W / N``, where N is the number of counted tokens of the whole optimizer step on
all processes (one all-reduce of a scalar). The result is the gradient of the token-mean loss over the
whole step: with gradient accumulation or several processes it equals one big batch's, however unevenly
the padding falls.

DeepSpeed keeps the gradients in its own partitions, out of ``on_before_optimizer_step``'s reach. There each
micro-batch's loss is normalized in ``training_step`` instead, by the counted tokens of that micro-batch on
all processes (one all-reduce of a scalar per micro-batch). That is token-exact without gradient accumulation;
with it, the step's gradient is the mean of the micro-batches' token means, and ``train/loss`` is logged per
micro-batch (Lightning calls ``on_before_optimizer_step`` for each one under DeepSpeed).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn
from torchmetrics import MeanMetric
from typing_extensions import override

from ..checkpoints import VerifiedCheckpointIO
from ..kernels import DistillationOutput
from ..losses import DistillationLoss
from ..models import CausalLM, build, vocab_size

# A frozen teacher is in eval mode on purpose; Lightning's notice about it is noise here.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", module="lightning")

# Config attributes of heads that transform the logits after the lm_head matmul; the fused-linear path
# would skip the transform, so such models use the logits path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
NONFINITE_ACTIONS = ("raise", "skip")


class DistillationModule(pl.LightningModule):
    """Student, teacher and loss: teacher freezing, the next-token shift, the loss call, logging, optimizers.

    Technique modules override :meth:`compute_loss`. Batches are dicts with ``input_ids`` ``(B, T)`` and
    optionally ``attention_mask`` (0 marks padding) and ``labels`` (aligned with ``input_ids``, the Hugging
    Face convention; -100 or the loss's ``ignore_index`` marks positions to skip). Position t is trained
    to predict token t+1.

    Args:
        student: the model to train: a Hugging Face causal LM or a :class:`~lit_distill.models.CausalLM`.
        teacher: the model to learn from (same vocabulary, up to head padding: see ``loss.vocab_size``).
        loss: a :class:`~lit_distill.losses.DistillationLoss` (divergence, temperature, alpha, ...); its
            ``reduction`` is ignored (see the module docstring for the normalization).
        optimizer: builds the optimizer from parameter groups (default AdamW).
        lr_scheduler: builds a scheduler from the optimizer, stepped every optimizer step; optional.
        fused_linear: compute the loss from hidden states and lm_head weights without the full logits,
            where both models allow it (plain linear heads; not heads with soft-capping or logit scaling).
        chunk_size: tokens per chunk of the fused-linear path (None: from a memory budget).
        vocab_size: the tokenizer's size; models described by a ``CausalLM`` config get it as their
            ``vocab_size`` (the command line links it from the data module).
        on_nonfinite: what a NaN or infinite training loss does. ``"raise"`` (default) stops the run with a
            ``FloatingPointError`` naming the optimizer step, before the optimizer applies anything;
            ``"skip"`` drops the micro-batch (it adds no gradient and no tokens; an optimizer step whose
            micro-batches were all dropped changes nothing), warns with the step, and counts the drops in
            ``train/skipped_batches``; on one process or with DDP only (FSDP and DeepSpeed refuse it).

    Raises:
        ValueError: when the technique needs a teacher and none is given, the vocabularies differ beyond
            what ``loss.vocab_size`` declares as padding, a model's vocabulary is smaller than the
            tokenizer's ``vocab_size``, or ``on_nonfinite`` is unknown.
    """

    #: the teacher is trained too (co-distillation); otherwise it is frozen and left out of checkpoints (not FSDP's)
    teacher_trains: bool = False
    #: the technique needs a teacher model
    needs_teacher: bool = True
    #: fields of the loss output logged every training step
    logged_statistics: tuple[str, ...] = ("soft", "hard", "teacher_ce", "agreement")
    #: check a checkpoint file's CRCs and format before resuming from it (reads the file once more)
    verify_checkpoints: bool = True

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
        super().__init__()
        if teacher is None and self.needs_teacher:
            raise ValueError(f"{type(self).__name__} needs a teacher model (teacher=...)")
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"unknown on_nonfinite={on_nonfinite!r}; choose 'raise' or 'skip'")
        self.student = build(student, vocab_size)
        self.teacher = build(teacher, vocab_size) if self.needs_teacher else None
        self.loss = loss if loss is not None else DistillationLoss()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.fused_linear = fused_linear
        self.chunk_size = chunk_size
        self.on_nonfinite = on_nonfinite
        self._check_vocabularies(vocab_size)
        if self.teacher is not None and not self.teacher_trains:
            self.teacher.requires_grad_(False)
            self.teacher.eval()
        self.register_load_state_dict_post_hook(_allow_missing_frozen_teacher)
        self.val_loss = MeanMetric()
        self.val_student_ce = MeanMetric()
        self.val_teacher_ce = MeanMetric()
        self._reset_step()
        self._loss_norm: float | None = None
        self._skipped_batches = 0
        self._batch_start: float | None = None

    # ----------------------------------------------------------------- setup
    def _check_vocabularies(self, tokenizer_size: int | None) -> None:
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            size = vocab_size(model) if model is not None else None
            if tokenizer_size is not None and size is not None and size < tokenizer_size:
                raise ValueError(
                    f"the tokenizer has {tokenizer_size} tokens but the {name}'s vocabulary has only {size}: the"
                    f" {name} was trained with another tokenizer; use that tokenizer (data.tokenizer) or a {name}"
                    " of this vocabulary"
                )
        if self.teacher is None:
            return
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
        strategy = self.trainer.strategy
        if self.on_nonfinite == "skip" and (self._sharded() or self._deepspeed()):
            # A dropped micro-batch sends a zero gradient straight to the parameters, outside the per-layer
            # collectives: FSDP waits for them forever, ZeRO reduces gradients in a mismatched order.
            raise ValueError(
                f"on_nonfinite='skip' works on one process or with DDP, not with {type(strategy).__name__}: a"
                " dropped micro-batch cannot take part in its gradient collectives. Use on_nonfinite='raise'"
            )
        if self.verify_checkpoints and type(strategy.checkpoint_io) is TorchCheckpointIO:
            strategy.checkpoint_io = VerifiedCheckpointIO(strategy.checkpoint_io)

    @override
    def configure_model(self) -> None:
        # ModelParallelStrategy (FSDP2) provides a device mesh: shard both models over its data-parallel ranks.
        if self.device_mesh is not None:
            from ..sharding import shard

            shard(self, self.device_mesh["data_parallel"])

    def _sharded(self) -> bool:
        """Whether the strategy shards the weights and restores them itself (FSDP1, FSDP2)."""
        return self._trainer is not None and isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy))

    def _deepspeed(self) -> bool:
        return self._trainer is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy)

    @override
    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None and not self.teacher_trains:
            self.teacher.eval()  # a frozen teacher never runs dropout
        return self

    @override
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameter_groups())
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "step"}}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: the student's trainable parameters."""
        return [{"params": [p for p in self.student.parameters() if p.requires_grad]}]

    # ------------------------------------------------------------- the loss
    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> DistillationOutput:
        """The technique's loss for a batch, with ``reduction="sum"`` over counted tokens."""
        return self.distill(batch)

    def distill(self, batch: Mapping[str, torch.Tensor], **overrides: Any) -> DistillationOutput:
        """Both forward passes and the distillation loss (sum over counted tokens); ``overrides`` go to the loss."""
        input_ids, attention_mask, labels = self.shifted_inputs(batch)
        with torch.set_grad_enabled(self.teacher_trains and torch.is_grad_enabled()):
            teacher_out = self._forward(self.teacher, input_ids, attention_mask)
        student_out = self._forward(self.student, input_ids, attention_mask)
        overrides = {"reduction": "sum", **overrides}
        if isinstance(student_out, tuple) and isinstance(teacher_out, tuple):
            (h_s, w_s, b_s), (h_t, w_t, b_t) = student_out, teacher_out
            return self.loss.fused_linear(
                h_s[:, :-1],
                w_s,
                h_t[:, :-1],
                w_t,
                labels,
                student_bias=b_s,
                teacher_bias=b_t,
                chunk_size=self.chunk_size,
                **overrides,
            )
        return self.loss(_logits(student_out)[:, :-1], _logits(teacher_out)[:, :-1], labels, **overrides)

    def shifted_inputs(
        self, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(input_ids, attention_mask, labels for positions 0..T-2), padding mapped to ``ignore_index``."""
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(
                f"a batch must be a dict with 'input_ids' (and optionally 'attention_mask', 'labels'); got {got}"
            )
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        labels = batch.get("labels", input_ids)[:, 1:]
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask[:, 1:] == 0, self.loss.ignore_index)
        return input_ids, attention_mask, labels

    def _forward(self, model: nn.Module, input_ids, attention_mask):
        """(hidden states, head weight, head bias) when the head can be fused, else the model output."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        base = getattr(model, "base_model", model)
        config = getattr(model, "config", None)
        fusable = (
            self.fused_linear
            and isinstance(head, nn.Linear)
            and base is not model
            and not any(getattr(config, name, None) for name in LOGIT_TRANSFORMS)
        )
        if fusable:
            hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            return hidden, head.weight, head.bias
        return model(input_ids=input_ids, attention_mask=attention_mask)

    # ------------------------------------------------------------- training
    def _reset_step(self) -> None:
        self._step_tokens: torch.Tensor | None = None
        self._step_loss: torch.Tensor | None = None
        self._step_batches: list[int] = []

    @override
    def on_train_start(self) -> None:
        self._loss_norm = None  # agreed again by the processes of this run

    @override
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch)
        if self._loss_norm is None:
            self._loss_norm = self._agreed_loss_norm(batch)
        if self._step_tokens is None:  # first micro-batch of an optimizer step
            self._step_tokens = torch.zeros((), dtype=torch.float32, device=out.loss.device)
            self._step_loss = torch.zeros((), dtype=torch.float32, device=out.loss.device)
        self._step_batches.append(batch_idx)
        if self.on_nonfinite == "skip" and not bool(torch.isfinite(out.loss)):
            return self._skip(out.loss, batch_idx)
        self._step_tokens = self._step_tokens + out.num_tokens
        self._step_loss = self._step_loss + out.loss.detach().float()
        for name in self.logged_statistics:
            self.log(f"train/{name}", getattr(out, name), on_step=True, on_epoch=False)
        if self._deepspeed():
            return self._deepspeed_loss(out)
        return out.loss / self._loss_norm

    def _deepspeed_loss(self, out: DistillationOutput) -> torch.Tensor:
        """The micro-batch's loss normalized by its counted tokens on all processes (module docstring)."""
        tokens = self.trainer.strategy.reduce(out.num_tokens.float(), reduce_op="sum")
        # DeepSpeed averages the gradients over the W processes and divides the loss by k (the accumulation steps)
        # a second time after Lightning: times W k, one division by k is left, the mean over the micro-batches.
        return out.loss * (self.trainer.world_size * self.trainer.accumulate_grad_batches / tokens.clamp(min=1))

    def _agreed_loss_norm(self, batch: Mapping[str, torch.Tensor]) -> float:
        """The constant ``c`` (label positions of the first micro-batch), the largest over the processes:
        any constant cancels in ``on_before_optimizer_step``, but only if every process divides by the same."""
        ids = batch["input_ids"]
        norm = torch.tensor(float(max(1, ids.shape[0] * (ids.shape[1] - 1))), device=self.device)
        if self.trainer.world_size > 1:
            norm = self.trainer.strategy.reduce(norm, reduce_op="max")
        return float(norm)

    def _skip(self, loss: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self._skipped_batches += 1
        warnings.warn(
            f"skipped batch {batch_idx} at step {self.trainer.global_step} (process {self.global_rank}): its loss"
            f" is {loss.item()} (on_nonfinite='skip'; {self._skipped_batches} skipped so far)",
            RuntimeWarning,
            stacklevel=2,
        )
        self.log("train/skipped_batches", float(self._skipped_batches), on_step=True, on_epoch=False)
        # A zero that still reaches every trainable parameter: under DDP each process must run a backward.
        params = [p for group in self.parameter_groups() for p in group["params"]]
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=loss.device))

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._step_tokens is None:
            return
        tokens, loss = self._step_tokens, self._step_loss
        if self.trainer.world_size > 1:
            tokens = self.trainer.strategy.reduce(tokens, reduce_op="sum")
            loss = self.trainer.strategy.reduce(loss, reduce_op="sum")
        if not bool(torch.isfinite(loss)):  # every process sees the same sum, so all stop here together
            raise FloatingPointError(self._nonfinite_message(loss))
        if not self._deepspeed():  # DeepSpeed holds the gradients; training_step normalized its losses instead
            self._rescale_gradients(optimizer, tokens)
        self.log("train/loss", loss / tokens.clamp(min=1), on_step=True, on_epoch=False, prog_bar=True)
        self._reset_step()

    def _rescale_gradients(self, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
        """Turn the gradient of ``sum_i loss_i / (c k W)`` into that of the step's token mean (module docstring)."""
        if not bool(tokens > 0):  # nothing counted (all skipped, or all padding): leave the weights as they are
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            return
        scale = self._loss_norm * self.trainer.accumulate_grad_batches * self.trainer.world_size / tokens
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(scale.to(p.grad.dtype))

    def _nonfinite_message(self, loss: torch.Tensor) -> str:
        batches = self._step_batches
        where = f"batch {batches[0]}" if len(batches) == 1 else f"batches {batches[0]}-{batches[-1]}"
        processes = " on at least one process" if self.trainer.world_size > 1 else ""
        return (
            f"the training loss is {loss.item()}{processes} at step {self.trainer.global_step} (epoch"
            f" {self.current_epoch}, {where}); nothing was applied, the weights are those after step"
            f" {self.trainer.global_step - 1}. Look for NaN or inf in the inputs or the models' activations (a"
            " learning rate too high, fp16 overflow), or set on_nonfinite='skip' to drop such batches"
        )

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._batch_start = time.perf_counter()

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._batch_start is not None:
            seconds = max(time.perf_counter() - self._batch_start, 1e-9)
            self.log("train/tokens_per_sec", batch["input_ids"].numel() / seconds, on_step=True, on_epoch=False)

    # ----------------------------------------------------------- validation
    @override
    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        out = self.distill(batch, hard_labels="labels")  # cross-entropies on the true next tokens
        tokens = out.num_tokens.clamp(min=1).float()
        self.val_loss.update(out.loss / tokens, weight=tokens)
        self.val_student_ce.update(out.hard, weight=tokens)
        self.val_teacher_ce.update(out.teacher_ce, weight=tokens)

    @override
    def on_validation_epoch_end(self) -> None:
        student_ce = self.val_student_ce.compute()
        teacher_ce = self.val_teacher_ce.compute()
        self.log("val/loss", self.val_loss.compute(), prog_bar=True)
        self.log("val/student_ce", student_ce)
        self.log("val/student_ppl", torch.exp(student_ce), prog_bar=True)
        self.log("val/teacher_ce", teacher_ce)
        self.log("val/teacher_ppl", torch.exp(teacher_ce))
        for metric in (self.val_loss, self.val_student_ce, self.val_teacher_ce):
            metric.reset()

    # ---------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A frozen teacher is rebuilt from its source, not stored (loading lets it be missing). FSDP keeps it:
        # a sharded checkpoint cannot be read without every key the module has.
        if self.teacher is not None and not self.teacher_trains and not self._sharded():
            checkpoint["state_dict"] = {
                k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.")
            }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:  # FSDP, FSDP2 and DeepSpeed load the weights themselves, leaving none here
            self._check_checkpoint_shapes(checkpoint["state_dict"])

    def _check_checkpoint_shapes(self, state: Mapping[str, torch.Tensor]) -> None:
        """A checkpoint of other models (another vocabulary, width or depth) is an error that says so."""
        own = self.state_dict()
        mismatched = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if not mismatched:
            return
        path = getattr(self.trainer, "ckpt_path", None) if self._trainer is not None else None
        shown = "; ".join(f"{k} is {tuple(state[k].shape)} there, {tuple(own[k].shape)} here" for k in mismatched[:3])
        hint = ""
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            key = next((k for k, v in self.named_parameters() if head is not None and v is head.weight), None)
            if key in mismatched:
                hint = (
                    f" The {name}'s vocabulary differs: {state[key].shape[0]} tokens in the checkpoint,"
                    f" {own[key].shape[0]} here; resume with the tokenizer the checkpoint was trained with."
                )
                break
        raise ValueError(
            f"checkpoint {path or ''} was saved from models of other shapes than this run's: {shown}"
            f"{' (and more)' if len(mismatched) > 3 else ''}.{hint}"
        )

    def save_student(self, directory: str) -> None:
        """Write the student in Hugging Face format (``from_pretrained`` loads it).

        In a multi-process run every process must call it (as :class:`~lit_distill.callbacks.ExportModel`
        does): sharded weights are gathered first, which takes all processes; process 0 writes.
        """
        self._save_pretrained("student", directory)

    def _save_pretrained(self, name: str, directory: str) -> None:
        model = getattr(self, name)
        if not hasattr(model, "save_pretrained"):
            raise TypeError(f"the {name} ({type(model).__name__}) has no save_pretrained; save its state_dict instead")
        from ..sharding import full_state_dict

        state = full_state_dict(self, name)  # a collective under FSDP, FSDP2 and ZeRO-3
        if self._trainer is None or self.trainer.is_global_zero:
            model.save_pretrained(directory, state_dict=dict(state))  # a copy: save_pretrained empties it


def cross_entropy_output(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> DistillationOutput:
    """Summed next-token CE of ``(B, T, V)`` logits on ``(B, T)`` targets, as a :class:`DistillationOutput`
    whose distillation-only fields (soft, teacher CE, agreement) are NaN."""
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    num_tokens = (targets != ignore_index).sum()
    nan = torch.full((), math.nan, device=loss.device)
    return DistillationOutput(loss, nan, loss.detach() / num_tokens.clamp(min=1), nan, nan, num_tokens)


def _allow_missing_frozen_teacher(module: DistillationModule, incompatible_keys: Any) -> None:
    """``load_state_dict`` hook: a frozen teacher may be missing (it keeps its weights), even when loading strictly."""
    if module.teacher is not None and not module.teacher_trains:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not k.startswith("teacher.")]


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output
