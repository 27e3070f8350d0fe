"""What every technique shares: one causal LM trained on next tokens, with token-exact normalization."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from types import FrameType
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from lightning.pytorch.utilities.parsing import collect_init_args
from torch import nn
from torchmetrics import MeanMetric
from typing_extensions import override

from ..kernels import DistillationOutput
from ..losses import DistillationLoss
from ..models import CausalLM, build, vocab_size
from ..reporting.throughput import TokensPerSecond
from .attention import attention_inputs
from .bits_per_byte import BitsPerByte
from .normalization import TokenNormalizer

#: LightningCLI's module builder, which ``load_from_checkpoint`` trusts to rebuild a module from a config
CLI_INSTANTIATOR = "lightning.pytorch.cli.instantiate_module"
_UNSAVED = object()


class CausalLMModule(pl.LightningModule):
    """A student trained on next tokens: the shift, optimizers, token-exact normalization, validation, export.

    Technique modules override :meth:`compute_loss`. Batches are dicts with ``input_ids`` ``(B, T)`` and
    optionally ``attention_mask`` (0 marks padding), ``labels`` (aligned with ``input_ids``, the Hugging
    Face convention; -100 or the loss's ``ignore_index`` marks positions to skip) and ``position_ids`` (packed
    rows: restarting at 0 at each document; every forward then gets them and a block-diagonal causal mask,
    :mod:`lit_distill.modules.attention`). Position t is trained to predict token t+1. Each optimizer step's
    gradient is that of the mean loss over the step's counted tokens on all processes
    (:mod:`lit_distill.modules.normalization`).

    Args:
        student: the model to train: a Hugging Face causal LM or a :class:`~lit_distill.models.CausalLM`.
        loss: a :class:`~lit_distill.losses.DistillationLoss` (divergence, temperature, alpha, ...); its
            ``reduction`` is ignored (the normalization above replaces it).
        optimizer: builds the optimizer from parameter groups (default AdamW).
        lr_scheduler: builds a scheduler from the optimizer, stepped every optimizer step; optional.
        vocab_size: the tokenizer's size; models described by a ``CausalLM`` config get it as their
            ``vocab_size`` (the command line links it from the data module).
        special_tokens: the tokenizer's ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``, set in the
            config of models described by a ``CausalLM`` config (the command line links them too).
        on_nonfinite: what a NaN or infinite training loss does: ``"raise"`` (default) stops the run naming
            the step, ``"skip"`` drops the micro-batch and counts it in ``train/skipped_batches`` (one process
            or DDP only). See :class:`~lit_distill.modules.normalization.TokenNormalizer`.

    Raises:
        ValueError: when a model's vocabulary is smaller than the tokenizer's ``vocab_size``, or
            ``on_nonfinite`` is unknown.
    """

    #: fields of the loss output logged every training step
    logged_statistics: tuple[str, ...] = ("hard",)

    def __init__(
        self,
        student: nn.Module | CausalLM,
        loss: DistillationLoss | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        vocab_size: int | None = None,
        special_tokens: dict[str, int] | None = None,
        on_nonfinite: str = "raise",
    ) -> None:
        super().__init__()
        self.normalizer = TokenNormalizer(on_nonfinite)
        self._save_rebuildable_hyperparameters(inspect.currentframe())
        self.tokenizer_size = vocab_size
        self.special_tokens = special_tokens
        self.student = build(student, vocab_size, special_tokens)
        self.loss = loss if loss is not None else DistillationLoss()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.check_tokenizer_fits("student", self.student, vocab_size)
        self.val_loss, self.val_student_ce, self.val_bits_per_byte = MeanMetric(), MeanMetric(), BitsPerByte()

    def _save_rebuildable_hyperparameters(self, frame: FrameType) -> None:
        """Hyperparameters as plain data from which ``load_from_checkpoint`` rebuilds the module.

        Under ``lit-distill fit`` LightningCLI hands over its config. Otherwise models given as ``CausalLM``
        specs and the loss are saved as ``class_path``/``init_args`` configs (read back the way LightningCLI
        reads its own, so ``torch.load(weights_only=True)`` still opens the checkpoint); models given as built
        modules and optimizer callables cannot be saved: pass them to ``load_from_checkpoint`` again.
        """
        if _given_hyperparameters.get() is not None:
            self.save_hyperparameters()
            return
        arguments: dict[str, Any] = {}
        for level in collect_init_args(frame, []):  # each constructor's arguments, the subclasses' last
            arguments.update(level)
        config = {name: _as_config(value) for name, value in arguments.items()}
        config = {name: value for name, value in config.items() if value is not _UNSAVED}
        cls = type(self)
        config.update(_class_path=f"{cls.__module__}.{cls.__qualname__}", _instantiator=CLI_INSTANTIATOR)
        self.save_hyperparameters(config)

    @staticmethod
    def check_tokenizer_fits(name: str, model: nn.Module | None, tokenizer_size: int | None) -> None:
        """A model whose vocabulary is smaller than the tokenizer's was trained with another tokenizer."""
        size = vocab_size(model) if model is not None else None
        if tokenizer_size is not None and size is not None and size < tokenizer_size:
            raise ValueError(
                f"the tokenizer has {tokenizer_size} tokens but the {name}'s vocabulary has only {size}: the"
                f" {name} was trained with another tokenizer; use that tokenizer (data.tokenizer) or a {name}"
                " of this vocabulary"
            )

    # ----------------------------------------------------------------- setup
    @override
    def setup(self, stage: str) -> None:
        self.normalizer.check_strategy(self.trainer)

    @override
    def configure_model(self) -> None:
        # ModelParallelStrategy (FSDP2) provides a device mesh: shard the models over its data-parallel ranks.
        if self.device_mesh is not None:
            from ..sharding import shard

            shard(self, self.device_mesh["data_parallel"])

    @override
    def configure_callbacks(self) -> list[Callback]:
        return [TokensPerSecond()]

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
        """The technique's loss for a batch, summed over counted tokens: here the student's cross-entropy."""
        input_ids, attention_mask, labels = self.shifted_inputs(batch)
        masks = attention_inputs(self.student, attention_mask, batch.get("position_ids"))
        logits = self.student(input_ids=input_ids, **masks).logits[:, :-1]
        return cross_entropy_output(logits, labels, self.loss.ignore_index)

    def shifted_inputs(
        self, batch: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(input_ids, attention_mask, labels for positions 0..T-2), padding mapped to ``ignore_index``.

        The 2-D ``attention_mask`` as the batch has it: a forward pass takes :func:`attention_inputs` of it and
        the batch's ``position_ids``, which adds the packed rows' mask."""
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

    # ------------------------------------------------------------- training
    @override
    def on_train_start(self) -> None:
        self.normalizer.start_run()

    @override
    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch)
        loss, counted = self.normalizer.micro_batch_loss(self, out, batch, batch_idx)
        if counted:
            for name in self.logged_statistics:
                self.log(f"train/{name}", getattr(out, name), on_step=True, on_epoch=False)
        else:
            self.log("train/skipped_batches", float(self.normalizer.skipped_batches), on_step=True, on_epoch=False)
        return loss

    @override
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        step_loss = self.normalizer.finish_step(self, optimizer)
        if step_loss is not None:
            self.log("train/loss", step_loss, on_step=True, on_epoch=False, prog_bar=True)

    # ----------------------------------------------------------- validation
    @override
    def on_validation_start(self) -> None:
        self.val_bits_per_byte.find_lengths(self.trainer, self.device)

    @override
    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        out = self.validation_output(batch)
        tokens = out.num_tokens.clamp(min=1).float()
        self.val_loss.update(out.loss / tokens, weight=tokens)
        self.val_student_ce.update(out.hard, weight=tokens)
        targets = self.shifted_inputs(batch)[2]
        self.val_bits_per_byte.update(out.hard * tokens, targets, out.num_tokens, self.loss.ignore_index)

    def validation_output(self, batch: Mapping[str, torch.Tensor]) -> DistillationOutput:
        """The validation loss summed over counted tokens, with the student's cross-entropy as ``hard``."""
        return self.compute_loss(batch)

    @override
    def on_validation_epoch_end(self) -> None:
        student_ce = self.val_student_ce.compute()
        # The student's cross-entropy is in the progress bar: it compares across techniques, val/loss does not.
        self.log("val/loss", self.val_loss.compute())
        self.log("val/student_ce", student_ce, prog_bar=True)
        self.log("val/student_ppl", torch.exp(student_ce))
        self.val_loss.reset()
        self.val_student_ce.reset()
        self.val_bits_per_byte.log_to(self)

    # ---------------------------------------------------------- checkpoints
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
        for name in ("student", "teacher"):
            model = getattr(self, name, None)
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

    # --------------------------------------------------------------- export
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


def _as_config(value: Any) -> Any:
    """A constructor argument as plain data jsonargparse can instantiate again, or ``_UNSAVED``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict) and all(isinstance(v, (bool, int, float, str, type(None))) for v in value.values()):
        return dict(value)
    if isinstance(value, (CausalLM, DistillationLoss)):  # options kept as attributes of the same names
        names = [name for name in inspect.signature(type(value)).parameters if hasattr(value, name)]
        return {
            "class_path": f"{type(value).__module__}.{type(value).__qualname__}",
            "init_args": {name: getattr(value, name) for name in names},
        }
    return _UNSAVED


def cross_entropy_output(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> DistillationOutput:
    """Summed next-token CE of ``(B, T, V)`` logits on ``(B, T)`` targets, as a :class:`DistillationOutput`
    whose distillation-only fields (soft, teacher CE, agreement) are NaN."""
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    num_tokens = (targets != ignore_index).sum()
    nan = torch.full((), math.nan, device=loss.device)
    return DistillationOutput(loss, nan, loss.detach() / num_tokens.clamp(min=1), nan, nan, num_tokens)
