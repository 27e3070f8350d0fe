"""Token-exact loss normalization across micro-batches and processes, and what a non-finite loss does.

Each micro-batch's loss is a *sum* over its counted tokens, divided by a constant ``c`` (the number of label
positions of the run's first micro-batch, the largest over the processes, only to keep magnitudes near 1).
Lightning divides every micro-batch's loss by ``accumulate_grad_batches`` (k) and DDP averages gradients over
the W processes, so before the optimizer step the gradient is ``sum_i g_i / (c k W)``. :meth:`finish_step`
then multiplies it by ``c k W / N``, where N is the number of counted tokens of the whole optimizer step on
all processes (one all-reduce of a scalar). The result is the gradient of the token-mean loss over the
whole step: with gradient accumulation or several processes it equals one big batch's, however unevenly
the padding falls.

DeepSpeed keeps the gradients in its own partitions, out of reach of that rescale. There each micro-batch's
loss is normalized when it is computed instead, by the counted tokens of that micro-batch on all processes
(one all-reduce of a scalar per micro-batch). That is token-exact without gradient accumulation; with it, the
step's gradient is the mean of the micro-batches' token means.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from ..kernels import DistillationOutput

NONFINITE_ACTIONS = ("raise", "skip")


def is_sharded(trainer: pl.Trainer | None) -> bool:
    """Whether the strategy shards the weights and restores them itself (FSDP1, FSDP2)."""
    return trainer is not None and isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))


def is_deepspeed(trainer: pl.Trainer | None) -> bool:
    """Whether DeepSpeed holds the gradients (they never reach ``p.grad``, so they cannot be rescaled)."""
    return trainer is not None and isinstance(trainer.strategy, DeepSpeedStrategy)


class TokenNormalizer:
    """Turns each micro-batch's summed loss into its share of the optimizer step's token-mean loss.

    The module calls :meth:`start_run` when training starts, :meth:`micro_batch_loss` in ``training_step``
    and :meth:`finish_step` in ``on_before_optimizer_step``.

    Args:
        on_nonfinite: ``"raise"`` stops the run with a ``FloatingPointError`` naming the step, before the
            optimizer applies anything; ``"skip"`` drops a micro-batch whose loss is NaN or infinite (no
            gradient, no tokens), warns and counts the drops.

    Raises:
        ValueError: for an unknown ``on_nonfinite``.
    """

    def __init__(self, on_nonfinite: str = "raise") -> None:
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"unknown on_nonfinite={on_nonfinite!r}; choose 'raise' or 'skip'")
        self.on_nonfinite = on_nonfinite
        self.skipped_batches = 0
        self._loss_norm: float | None = None
        self._reset_step()

    def _reset_step(self) -> None:
        self._tokens: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None
        self._batches: list[int] = []

    def check_strategy(self, trainer: pl.Trainer) -> None:
        """Refuse ``on_nonfinite='skip'`` where a dropped micro-batch would break the gradient collectives."""
        if self.on_nonfinite == "skip" and (is_sharded(trainer) or is_deepspeed(trainer)):
            # A dropped micro-batch sends a zero gradient straight to the parameters, outside the per-layer
            # collectives: FSDP waits for them forever, ZeRO reduces gradients in a mismatched order.
            raise ValueError(
                f"on_nonfinite='skip' works on one process or with DDP, not with {type(trainer.strategy).__name__}:"
                " a dropped micro-batch cannot take part in its gradient collectives. Use on_nonfinite='raise'"
            )

    def start_run(self) -> None:
        self._loss_norm = None  # agreed again by the processes of this run
        self._reset_step()

    def micro_batch_loss(
        self, module: pl.LightningModule, out: DistillationOutput, batch: Mapping, batch_idx: int
    ) -> tuple[torch.Tensor, bool]:
        """(the loss to backpropagate, whether the micro-batch counts); a skipped one gives a zero loss."""
        trainer = module.trainer
        if self._loss_norm is None:
            self._loss_norm = _agreed_loss_norm(trainer, batch, module.device)
        if self._tokens is None:  # first micro-batch of an optimizer step
            self._tokens = torch.zeros((), dtype=torch.float32, device=out.loss.device)
            self._loss = torch.zeros((), dtype=torch.float32, device=out.loss.device)
        self._batches.append(batch_idx)
        if self.on_nonfinite == "skip" and not bool(torch.isfinite(out.loss)):
            return self._skip(module, out.loss, batch_idx), False
        self._tokens = self._tokens + out.num_tokens
        self._loss = self._loss + out.loss.detach().float()
        if is_deepspeed(trainer):
            tokens = trainer.strategy.reduce(out.num_tokens.float(), reduce_op="sum")
            # DeepSpeed averages the gradients over the W processes and divides the loss by k (the accumulation
            # steps) a second time after Lightning: times W k, one division by k is left, the micro-batch mean.
            return out.loss * (trainer.world_size * trainer.accumulate_grad_batches / tokens.clamp(min=1)), True
        return out.loss / self._loss_norm, True

    def finish_step(self, module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
        """Rescale the step's gradients to the token mean; returns the step's token-mean loss (None: no batch)."""
        if self._tokens is None:
            return None
        trainer = module.trainer
        tokens, loss = self._tokens, self._loss
        if trainer.world_size > 1:
            tokens = trainer.strategy.reduce(tokens, reduce_op="sum")
            loss = trainer.strategy.reduce(loss, reduce_op="sum")
        if not bool(torch.isfinite(loss)):  # every process sees the same sum, so all stop here together
            raise FloatingPointError(self._nonfinite_message(trainer, module.current_epoch, loss))
        if not is_deepspeed(trainer):  # DeepSpeed holds the gradients; micro_batch_loss normalized instead
            self._rescale_gradients(trainer, optimizer, tokens)
        self._reset_step()
        return loss / tokens.clamp(min=1)

    def _rescale_gradients(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, tokens: torch.Tensor) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if not bool(tokens > 0):  # nothing counted (all skipped, or all padding): leave the weights as they are
            for p in params:
                p.grad = None
            return
        scale = self._loss_norm * trainer.accumulate_grad_batches * trainer.world_size / tokens
        for p in params:
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.dtype))

    def _skip(self, module: pl.LightningModule, loss: torch.Tensor, batch_idx: int) -> torch.Tensor:
        self.skipped_batches += 1
        warnings.warn(
            f"skipped batch {batch_idx} at step {module.trainer.global_step} (process {module.global_rank}): its"
            f" loss is {loss.item()} (on_nonfinite='skip'; {self.skipped_batches} skipped so far)",
            RuntimeWarning,
            stacklevel=3,
        )
        # A zero that still reaches every trainable parameter: under DDP each process must run a backward.
        params = [p for group in module.parameter_groups() for p in group["params"]]
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=loss.device))

    def _nonfinite_message(self, trainer: pl.Trainer, epoch: int, loss: torch.Tensor) -> str:
        batches = self._batches
        where = f"batch {batches[0]}" if len(batches) == 1 else f"batches {batches[0]}-{batches[-1]}"
        processes = " on at least one process" if trainer.world_size > 1 else ""
        return (
            f"the training loss is {loss.item()}{processes} at step {trainer.global_step} (epoch"
            f" {epoch}, {where}); nothing was applied, the weights are those after step"
            f" {trainer.global_step - 1}. Look for NaN or inf in the inputs or the models' activations (a"
            " learning rate too high, fp16 overflow), or set on_nonfinite='skip' to drop such batches"
        )


def _agreed_loss_norm(trainer: pl.Trainer, batch: Mapping, device: torch.device) -> float:
    """The constant ``c`` (label positions of the first micro-batch), the largest over the processes: any
    constant cancels in :meth:`TokenNormalizer.finish_step`, but only if every process divides by the same."""
    ids = batch["input_ids"]
    norm = torch.tensor(float(max(1, ids.shape[0] * (ids.shape[1] - 1))), device=device)
    if trainer.world_size > 1:
        norm = trainer.strategy.reduce(norm, reduce_op="max")
    return float(norm)
