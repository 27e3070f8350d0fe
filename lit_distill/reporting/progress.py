"""Training progress counted in optimizer steps: a bar in a terminal, flushed lines in a file or a pipe."""

from __future__ import annotations

import math
import sys
import time
from datetime import timedelta
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from typing_extensions import override


def _format_value(value: Any) -> str:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _format_seconds(seconds: float) -> str:
    return str(timedelta(seconds=round(seconds)))


class StepProgressBar(ProgressBar):
    """Training progress in optimizer steps, readable in a terminal and in a log file.

    In a terminal, a bar of optimizer steps out of ``max_steps`` (or the trainer's estimate of the run's
    steps), with the metrics logged with ``prog_bar=True``; validation shows a second, transient bar. Written
    to a file or a pipe, a line every ``refresh_rate`` optimizer steps, one after every validation and one at
    the end, each flushed at once, so that a log shows the run as it goes. Counting optimizer steps, the bar
    agrees with ``max_steps`` under gradient accumulation, and it leaves out Lightning's ``v_num``.

    Args:
        refresh_rate: optimizer steps between updates; None: every step in a terminal, the trainer's
            ``log_every_n_steps`` otherwise.
        stream: where to write (default: ``sys.stderr`` when the bar starts); whether it is a terminal
            chooses between the bar and lines.

    Raises:
        ValueError: if ``refresh_rate`` is not positive.

    Example:
        >>> trainer = Trainer(max_steps=1000, callbacks=[StepProgressBar()])
    """

    def __init__(self, refresh_rate: int | None = None, stream: TextIO | None = None) -> None:
        super().__init__()
        if refresh_rate is not None and refresh_rate < 1:
            raise ValueError(f"refresh_rate must be a positive number of steps, got {refresh_rate}")
        self.refresh_rate = refresh_rate
        self._stream = stream
        self._enabled = True
        self._bar: Any = None
        self._eval_bar: Any = None
        self._start = 0.0
        self._start_step = 0
        self._last_step: int | None = None
        self._printed_step: int | None = None

    # ------------------------------------------------------------ Lightning's ProgressBar interface
    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @override
    def disable(self) -> None:
        self._enabled = False

    @override
    def enable(self) -> None:
        self._enabled = True

    @override
    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.write(" ".join(map(str, args)), file=self.stream)
        else:
            print(*args, file=self.stream, flush=True, **kwargs)

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = dict(trainer.progress_bar_metrics)
        metrics.pop("v_num", None)
        return metrics

    # ------------------------------------------------------------ helpers
    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def interactive(self) -> bool:
        """Whether the stream is a terminal (a redrawn bar) rather than a file or pipe (lines)."""
        isatty = getattr(self.stream, "isatty", None)
        return bool(isatty and isatty())

    def total_steps(self, trainer: pl.Trainer) -> int | None:
        """Optimizer steps the run will take: ``max_steps``, else the trainer's estimate (None if unknown)."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            estimate = trainer.estimated_stepping_batches
        except Exception:  # no dataloader length (an iterable dataset)
            return None
        return int(estimate) if math.isfinite(estimate) else None

    def _rate(self, trainer: pl.Trainer) -> int:
        if self.refresh_rate is not None:
            return self.refresh_rate
        return 1 if self.interactive else max(1, int(trainer.log_every_n_steps))

    def _metrics_text(self, trainer: pl.Trainer, pl_module: pl.LightningModule, prefix: str | None = None) -> str:
        items = self.get_metrics(trainer, pl_module).items()
        return "  ".join(f"{k} {_format_value(v)}" for k, v in items if prefix is None or k.startswith(prefix))

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _step_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        step, total = trainer.global_step, self.total_steps(trainer)
        done = f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"
        elapsed = time.monotonic() - self._start
        parts = [done, f"epoch {trainer.current_epoch}", _format_seconds(elapsed)]
        steps_run = step - self._start_step
        if steps_run > 0 and elapsed > 0:
            rate = steps_run / elapsed
            parts.append(f"{rate:.3g} steps/s" if rate >= 1 else f"{1 / rate:.3g} s/step")
            if total:
                parts.append(f"{_format_seconds((total - step) / rate)} left")
        metrics = self._metrics_text(trainer, pl_module, prefix="train")
        return " | ".join(parts) + (f" | {metrics}" if metrics else "")

    # ------------------------------------------------------------ training
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()
        self._start_step = self._last_step = trainer.global_step
        self._printed_step = None
        if not self.is_enabled or not self.interactive:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=self.total_steps(trainer),
            initial=trainer.global_step,
            desc="train",
            unit="step",
            file=self.stream,
            dynamic_ncols=True,
            leave=True,
        )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.is_enabled or step == self._last_step:  # within gradient accumulation
            return
        self._last_step = step
        total = self.total_steps(trainer)
        if step % self._rate(trainer) != 0 and step != total:
            return
        if self._bar is not None:
            self._bar.set_description(f"train (epoch {trainer.current_epoch})", refresh=False)
            self._bar.set_postfix_str(self._metrics_text(trainer, pl_module), refresh=False)
            self._bar.update(step - self._bar.n)
            if step == total:  # closed now: Lightning's "`Trainer.fit` stopped" comes before on_train_end
                self._bar.close()
                self._bar = None
        else:
            self._line(self._step_line(trainer, pl_module))
        self._printed_step = step

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self._metrics_text(trainer, pl_module), refresh=False)
            self._bar.update(trainer.global_step - self._bar.n)
            self._bar.close()
            self._bar = None
        elif self.is_enabled and self._printed_step != trainer.global_step and not self.interactive:
            self._line(self._step_line(trainer, pl_module))

    # ------------------------------------------------------------ validation and test
    def _eval_start(self, trainer: pl.Trainer, description: str, totals: Any) -> None:
        if not self.is_enabled or trainer.sanity_checking or not self.interactive:
            return
        from tqdm.auto import tqdm

        total = sum(t for t in totals if math.isfinite(t)) if totals else None
        self._eval_bar = tqdm(
            total=total or None,
            desc=description,
            unit="batch",
            file=self.stream,
            dynamic_ncols=True,
            leave=False,
            position=1 if self._bar is not None else 0,
        )

    def _eval_batch_end(self) -> None:
        if self._eval_bar is not None:
            self._eval_bar.update(1)

    def _eval_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, description: str) -> None:
        if self._eval_bar is not None:
            self._eval_bar.close()
            self._eval_bar = None
        if not self.is_enabled or trainer.sanity_checking:
            return
        prefix = "val" if description == "validation" else None
        metrics = self._metrics_text(trainer, pl_module, prefix=prefix)
        where = f" at step {trainer.global_step}" if trainer.training or trainer.state.fn == "fit" else ""
        self.print(f"{description}{where}: {metrics or 'done'}")

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "validation", trainer.num_val_batches)

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_end()

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, pl_module, "validation")

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "test", trainer.num_test_batches)

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._eval_batch_end()

    @override
    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, pl_module, "test")
