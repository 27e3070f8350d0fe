"""An exponential moving average of the student's weights, without a copy of the teacher."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from typing_extensions import override

#: strategies that shard the student's weights across processes (FSDP2 is Lightning's ModelParallelStrategy)
SHARDING_STRATEGIES = (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)


class StudentEMA(Callback):
    r"""Keep ``average = decay * average + (1 - decay) * weights`` of the student's trained weights, after every
    optimizer step from ``start_step`` on (the first update copies the weights), evaluate with it, and end with it.

    At a constant learning rate a student's weights jitter from step to step, and so do its samples: the demo's
    students, scored every 10 steps over their last 50, moved the teacher's NLL of their text by up to 0.3. The
    average of the last steps (``decay=0.9`` weighs about the last ten) settles that and lowers the validation
    loss too (docs/experiments.md). Lightning's ``EMAWeightAveraging`` averages the whole LightningModule, so it
    would copy a frozen teacher as well; this averages ``pl_module.student`` only.

    - Validation (and everything that runs in it, such as ``OnPolicyEvaluation``) sees the average; training
      continues from the weights as trained. The average is kept in float32 for bfloat16 or float16 weights.
    - When training ends the student keeps the average, so ``ExportModel`` and ``save_student`` write it.
    - Checkpoints keep the trained weights as the model's state and the average in this callback's state, so a
      resumed run continues both exactly.
    - For a student whose weights every process holds whole (one device, DDP); sharded students (FSDP, FSDP2,
      DeepSpeed) are refused.

    Args:
        decay: in [0, 1): the weight of the average so far; 0 keeps the latest weights.
        start_step: the first optimizer step (counted from 1) whose weights enter the average.

    Raises:
        ValueError: for a decay outside [0, 1), a negative start_step, a module without ``student``, or a
            sharding strategy.

    Example:
        >>> Trainer(callbacks=[StudentEMA(decay=0.9)])
    """

    def __init__(self, decay: float = 0.9, start_step: int = 0) -> None:
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"decay must lie in [0, 1) (0.9 weighs about the last ten steps), got {decay}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
        self.decay, self.start_step = float(decay), start_step
        self.updates = 0  # steps averaged so far
        self.last_step = 0  # the global step of the latest update: one update per optimizer step
        self.average: dict[str, torch.Tensor] = {}
        self._trained: dict[str, torch.Tensor] | None = None  # the trained weights, aside during validation

    @staticmethod
    def trained_weights(pl_module: pl.LightningModule) -> dict[str, torch.nn.Parameter]:
        """The student's parameters that train, by name."""
        student = getattr(pl_module, "student", None)
        if not isinstance(student, torch.nn.Module):
            raise ValueError(
                f"StudentEMA averages pl_module.student, but {type(pl_module).__name__} has no student module;"
                " use it with a lit-distill module, or Lightning's EMAWeightAveraging for another LightningModule"
            )
        return {name: p for name, p in student.named_parameters() if p.requires_grad}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if isinstance(trainer.strategy, SHARDING_STRATEGIES):
            raise ValueError(
                f"StudentEMA needs the whole student on every process; {type(trainer.strategy).__name__} shards"
                " it. Use one device or DDP, or leave StudentEMA out"
            )
        restored = self.average  # a checkpoint's average, when load_state_dict came first
        # float32 at least: in bfloat16, (1 - decay) * (weights - average) rounds away as the two converge
        self.average = {
            name: p.detach().to(torch.promote_types(p.dtype, torch.float32), copy=True)
            for name, p in self.trained_weights(pl_module).items()
        }
        if restored:
            self._load_average(restored)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps so far: unchanged between accumulated micro-batches
        if step <= self.last_step or step < max(1, self.start_step):
            return
        with torch.no_grad():
            for name, weight in self.trained_weights(pl_module).items():
                if self.updates == 0:
                    self.average[name].copy_(weight)
                else:
                    self.average[name].lerp_(weight.detach().to(self.average[name].dtype), 1 - self.decay)
        self.updates += 1
        self.last_step = step

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and self.updates > 0:  # not in the sanity check before the first step
            weights = self.trained_weights(pl_module)
            self._trained = {name: weight.detach().clone() for name, weight in weights.items()}
            self._load_into(weights, self.average)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._trained is not None:  # back to the weights as trained, bit for bit
            self._load_into(self.trained_weights(pl_module), self._trained)
            self._trained = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.updates:
            self._load_into(self.trained_weights(pl_module), self.average)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "last_step": self.last_step, "average": dict(self.average)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates, self.last_step = state_dict["updates"], state_dict["last_step"]
        if self.average:
            self._load_average(state_dict["average"])
        else:  # setup has not run yet: it copies these in
            self.average = dict(state_dict["average"])

    def _load_average(self, saved: dict[str, torch.Tensor]) -> None:
        if set(saved) != set(self.average):
            raise ValueError(
                "the checkpoint's StudentEMA average does not match the student's trained weights:"
                f" {sorted(set(saved) ^ set(self.average))[:4]}"
            )
        self._load_into(self.average, saved)

    @staticmethod
    def _load_into(targets: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, target in targets.items():
                target.copy_(values[name])
