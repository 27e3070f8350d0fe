"""Schedules for the loss's hyperparameters (alpha, temperature) and on-policy's lmbda as Lightning callbacks."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

STRATEGIES = ("constant", "linear", "cosine", "step", "exponential")
#: what a checkpoint keeps of a schedule: its settings, with ``total_steps`` as resolved when fitting started
STATE_KEYS = ("start", "end", "strategy", "warmup_steps", "warmup_start", "total_steps", "stages")


class HyperparameterSchedule(Callback):
    r"""Set ``pl_module.loss.<attribute>`` (or another object's, :meth:`holder`) from the global step before every
    training batch, and log it.

    After ``warmup_steps`` (during which the value moves linearly from ``warmup_start`` to ``start``, or
    holds ``start`` when ``warmup_start`` is None), the value goes from ``start`` to ``end`` over the
    remaining steps up to ``total_steps``, then stays at ``end``. With progress ``p`` in [0, 1]:

    - ``constant``: ``start``
    - ``linear``: ``start + (end - start) * p``
    - ``cosine``: ``end + (start - end) * (1 + cos(pi * p)) / 2``
    - ``step``: ``start + (end - start) * floor(p * stages) / stages`` (``stages`` equal jumps)
    - ``exponential``: ``start * (end / start) ** p`` (start and end > 0)

    The value depends on the global step only, so a resumed run continues the schedule exactly; the
    resolved ``total_steps`` is saved in checkpoints. Override :meth:`value_at` for a custom schedule.

    Args:
        start: value after warmup.
        end: final value (default: ``start``).
        strategy: one of ``constant``, ``linear``, ``cosine``, ``step``, ``exponential``.
        warmup_steps: steps before the schedule starts.
        warmup_start: value at step 0 of the warmup; None holds ``start``.
        total_steps: the step at which ``end`` is reached; None takes the trainer's estimate of the total
            number of optimizer steps when fitting starts.
        stages: number of jumps of the ``step`` strategy.

    Raises:
        ValueError: for an unknown strategy, values outside the attribute's range, negative warmup, or
            ``total_steps <= warmup_steps``.
    """

    #: the attribute of ``pl_module.loss`` this schedule sets; set by subclasses
    attribute: str = ""

    def holder(self, pl_module: pl.LightningModule) -> Any:
        """The object whose ``attribute`` the schedule sets: the module's loss."""
        return getattr(pl_module, "loss", None)

    def __init__(
        self,
        start: float,
        end: float | None = None,
        strategy: str = "linear",
        warmup_steps: int = 0,
        warmup_start: float | None = None,
        total_steps: int | None = None,
        stages: int = 4,
    ) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        end = start if end is None else end
        for name, value in (("start", start), ("end", end), ("warmup_start", warmup_start)):
            if value is not None:
                self._check_value(name, float(value))
        if strategy == "exponential" and (start <= 0 or end <= 0):
            raise ValueError(f"the exponential strategy needs start and end > 0, got {start} and {end}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if stages < 1:
            raise ValueError(f"stages must be >= 1, got {stages}")
        if total_steps is not None:
            self._check_total(total_steps, warmup_steps)
        self.start, self.end, self.strategy = float(start), float(end), strategy
        self.warmup_steps, self.warmup_start = warmup_steps, warmup_start
        self.total_steps, self.stages = total_steps, stages

    def _check_value(self, name: str, value: float) -> None:
        """Subclasses restrict the range (alpha in [0, 1], temperature > 0)."""

    @staticmethod
    def _check_total(total_steps: int, warmup_steps: int) -> None:
        if total_steps <= warmup_steps:
            raise ValueError(
                f"total_steps={total_steps} must exceed warmup_steps={warmup_steps}: the schedule needs steps"
                " after the warmup (set total_steps, or train for longer)"
            )

    def value_at(self, step: int) -> float:
        """The value at optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            if self.warmup_start is None:
                return self.start
            return self.warmup_start + (self.start - self.warmup_start) * step / self.warmup_steps
        if self.strategy == "constant" or self.total_steps is None:
            return self.start
        p = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        if self.strategy == "linear":
            return self.start + (self.end - self.start) * p
        if self.strategy == "cosine":
            return self.end + (self.start - self.end) * (1 + math.cos(math.pi * p)) / 2
        if self.strategy == "step":
            return self.start + (self.end - self.start) * math.floor(p * self.stages) / self.stages
        return self.start * (self.end / self.start) ** p

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(self.holder(pl_module), self.attribute):
            raise ValueError(
                f"{type(self).__name__} sets pl_module.loss.{self.attribute}, but {type(pl_module).__name__}"
                " has no such loss attribute"
            )
        if self.total_steps is None and self.strategy != "constant":
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError(f"{type(self).__name__}: pass total_steps (the trainer cannot estimate it)")
            self._check_total(int(total), self.warmup_steps)
            self.total_steps = int(total)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        value = self.value_at(trainer.global_step)
        setattr(self.holder(pl_module), self.attribute, value)
        pl_module.log(f"train/{self.attribute}", value, on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in STATE_KEYS}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        unknown = sorted(set(state_dict) - set(STATE_KEYS))
        if unknown:
            raise ValueError(f"{type(self).__name__}: the checkpoint's schedule state has unknown keys {unknown}")
        for key in STATE_KEYS:
            if key in state_dict:
                setattr(self, key, state_dict[key])

    @property
    def state_key(self) -> str:
        return self._generate_state_key(attribute=self.attribute)


class AlphaScheduler(HyperparameterSchedule):
    """Schedule the soft/hard mix ``alpha`` (in [0, 1]) of the module's loss.

    Example:
        >>> # from pure soft labels to an even mix over the first 1000 steps
        >>> AlphaScheduler(start=1.0, end=0.5, strategy="cosine", total_steps=1000)
        ... # trainer = Trainer(callbacks=[...])
    """

    attribute = "alpha"

    def _check_value(self, name: str, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha {name} must lie in [0, 1], got {value}")


class TemperatureScheduler(HyperparameterSchedule):
    """Schedule the softmax ``temperature`` (> 0) of the module's loss.

    Example:
        >>> TemperatureScheduler(start=4.0, end=1.0, strategy="exponential", warmup_steps=100)
    """

    attribute = "temperature"

    def _check_value(self, name: str, value: float) -> None:
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"temperature {name} must be a finite number > 0, got {value}")


class LmbdaScheduler(HyperparameterSchedule):
    """Schedule ``lmbda`` (in [0, 1]), the fraction of on-policy batches of an ``OnPolicyDistillation``.

    On-policy samples teach little while the student is still babbling: ramping ``lmbda`` up lets it learn
    from the data first (GKD starts from a fine-tuned student for the same reason).

    Example:
        >>> LmbdaScheduler(start=0.0, end=1.0, strategy="linear")  # off-policy first, on-policy at the end
    """

    attribute = "lmbda"

    def holder(self, pl_module: pl.LightningModule) -> Any:
        if not hasattr(pl_module, "lmbda"):
            raise ValueError(
                f"LmbdaScheduler sets the lmbda of an OnPolicyDistillation, not of {type(pl_module).__name__}"
            )
        return pl_module

    def _check_value(self, name: str, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"lmbda {name} must lie in [0, 1], got {value}")
