"""What a run prints: Lightning's notices quieted, progress in optimizer steps, lines flushed as they come."""

import io
import logging
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel

from lit_distill.reporting import StepProgressBar, quiet


class Stream(io.StringIO):
    """A file-like stream that records flushes and says whether it is a terminal."""

    def __init__(self, tty: bool = False) -> None:
        super().__init__()
        self.tty, self.flushed = tty, 0

    def isatty(self) -> bool:
        return self.tty

    def flush(self) -> None:
        self.flushed += 1
        super().flush()


class LoggingModel(BoringModel):
    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train/loss", out["loss"], prog_bar=True)
        return out

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.step(batch), prog_bar=True)


class Snapshot(Callback):
    """What the stream held when each optimizer step ended, before the fit ended."""

    def __init__(self, stream: Stream) -> None:
        self.stream, self.seen = stream, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen[trainer.global_step] = self.stream.getvalue()


def fit(bar: StepProgressBar, *callbacks: Callback, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        callbacks=[bar, *callbacks],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(LoggingModel())
    return trainer


def test_lines_count_optimizer_steps_under_gradient_accumulation():
    stream = Stream()
    fit(StepProgressBar(refresh_rate=1, stream=stream), max_steps=3, accumulate_grad_batches=4, limit_val_batches=0)
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 1/3 (33%)", "step 2/3 (67%)", "step 3/3 (100%)"]
    assert all("train/loss" in line for line in lines)
    assert "v_num" not in stream.getvalue() and "12/3" not in stream.getvalue() and "Epoch" not in stream.getvalue()


def test_lines_reach_a_file_as_the_run_goes():
    stream = Stream()
    snapshot = Snapshot(stream)
    fit(StepProgressBar(refresh_rate=2, stream=stream), snapshot, max_steps=5, limit_val_batches=0)
    assert "step 2/5" in snapshot.seen[3] and "step 4/5" not in snapshot.seen[3]  # written before the fit ended
    assert stream.flushed >= 3  # each line flushed: a redirected run shows its progress at once
    assert stream.getvalue().splitlines()[-1].startswith("step 5/5 (100%)")  # the last step, once


def test_refresh_rate_defaults_to_log_every_n_steps_and_validation_gets_a_line():
    stream = Stream()
    fit(StepProgressBar(stream=stream), max_steps=6, log_every_n_steps=3, val_check_interval=3, limit_val_batches=2)
    text = stream.getvalue()
    steps = [line.split(" | ")[0] for line in text.splitlines() if line.startswith("step")]
    assert steps == ["step 3/6 (50%)", "step 6/6 (100%)"]
    assert "validation at step 3: val/loss" in text


def test_terminal_gets_a_bar_of_optimizer_steps():
    stream = Stream(tty=True)
    fit(StepProgressBar(stream=stream), max_steps=3, accumulate_grad_batches=2, limit_val_batches=0)
    text = stream.getvalue()
    assert "3/3" in text and "6/3" not in text and "v_num" not in text


def test_an_unlimited_run_counts_the_trainers_estimate():
    stream = Stream()
    trainer = fit(StepProgressBar(refresh_rate=4, stream=stream), max_epochs=1, limit_train_batches=8)
    assert trainer.global_step == 8
    assert "step 8/8 (100%)" in stream.getvalue()


def test_refresh_rate_must_be_positive():
    with pytest.raises(ValueError, match="refresh_rate must be a positive"):
        StepProgressBar(refresh_rate=0)


def test_quiet_drops_the_notices_every_trainer_prints(caplog):
    caplog.set_level(logging.INFO)
    quiet()
    pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=1)
    assert "GPU available" not in caplog.text and "TPU available" not in caplog.text and "Tip" not in caplog.text
    assert "`Trainer(limit_val_batches=1)` was configured" in caplog.text  # what the configuration does stays
    from transformers.utils import logging as hf_logging

    assert not hf_logging.is_progress_bar_enabled()


def test_quiet_drops_the_pytree_deprecation_warning():
    from torch.utils._pytree import LeafSpec

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet()
        LeafSpec()
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    assert torch.is_tensor(torch.zeros(1))  # torch itself untouched
