"""Alpha and temperature schedules: documented values, validation, driving the loss, exact resume."""

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import KINDS, StopAt, loader, make_batch, make_module, trainer
from lightning.pytorch.callbacks import Callback

from lit_distill.callbacks import AlphaScheduler, TemperatureScheduler

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
        ("linear", [1.0, 0.875, 0.75, 0.625, 0.5]),
        (
            "cosine",
            [1.0, 0.5 + 0.25 * (1 + math.cos(math.pi / 4)), 0.75, 0.5 + 0.25 * (1 + math.cos(3 * math.pi / 4)), 0.5],
        ),
        ("step", [1.0, 0.875, 0.75, 0.625, 0.5]),  # 4 stages over 4 steps: one jump per step
        ("exponential", [1.0, 0.5**0.25, 0.5**0.5, 0.5**0.75, 0.5]),
    ],
)
def test_documented_values(strategy, expected):
    schedule = AlphaScheduler(start=1.0, end=0.5, strategy=strategy, total_steps=4)
    got = [schedule.value_at(step) for step in range(5)]
    assert got == pytest.approx(expected)
    assert schedule.value_at(100) == pytest.approx(expected[-1])  # holds the end value


def test_step_strategy_holds_between_jumps():
    schedule = TemperatureScheduler(start=4.0, end=1.0, strategy="step", total_steps=12, stages=3)
    assert [schedule.value_at(s) for s in (0, 3, 4, 7, 8, 11, 12)] == [4.0, 4.0, 3.0, 3.0, 2.0, 2.0, 1.0]


def test_warmup():
    schedule = AlphaScheduler(start=1.0, end=0.0, warmup_steps=4, warmup_start=0.0, total_steps=8)
    assert [schedule.value_at(s) for s in range(9)] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0, 0.75, 0.5, 0.25, 0])
    held = TemperatureScheduler(start=2.0, end=1.0, warmup_steps=3, total_steps=5)
    assert [held.value_at(s) for s in range(6)] == pytest.approx([2, 2, 2, 2, 1.5, 1])


def test_custom_schedule_overrides_value_at():
    class Halving(AlphaScheduler):
        def value_at(self, step):
            return 0.5**step

    assert Halving(start=1.0).value_at(3) == 0.125


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: AlphaScheduler(start=1.5), r"alpha start must lie in \[0, 1\]"),
        (lambda: AlphaScheduler(start=1.0, end=-0.1), r"alpha end must lie in \[0, 1\]"),
        (lambda: TemperatureScheduler(start=0.0), "temperature start must be a finite number > 0"),
        (lambda: TemperatureScheduler(start=2.0, warmup_start=-1.0, warmup_steps=2), "temperature warmup_start"),
        (lambda: AlphaScheduler(start=1.0, strategy="sawtooth"), "unknown strategy"),
        (lambda: AlphaScheduler(start=1.0, end=0.0, strategy="exponential"), "exponential strategy needs"),
        (
            lambda: AlphaScheduler(start=1.0, warmup_steps=10, total_steps=10),
            "total_steps=10 must exceed warmup_steps=10",
        ),
        (lambda: AlphaScheduler(start=1.0, warmup_steps=-1), "warmup_steps must be >= 0"),
        (lambda: AlphaScheduler(start=1.0, stages=0), "stages must be >= 1"),
    ],
)
def test_bad_schedules(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_total_steps_from_the_trainer_must_exceed_warmup():
    module = make_module("soft")
    with pytest.raises(ValueError, match="total_steps=3 must exceed warmup_steps=5"):
        trainer(max_steps=3, callbacks=[AlphaScheduler(start=1.0, end=0.0, warmup_steps=5)]).fit(
            module, loader(make_batch())
        )


def test_needs_a_loss_attribute():
    class NoLoss(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="has no such loss attribute"):
        AlphaScheduler(start=1.0).on_fit_start(None, NoLoss())


class Recorder(Callback):
    """Records the loss's alpha and temperature as the model sees them, and the loss, every step."""

    def __init__(self):
        self.values = {}
        self.losses = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.values[trainer.global_step] = (pl_module.loss.alpha, pl_module.loss.temperature)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def schedules():
    return [
        AlphaScheduler(start=1.0, end=0.2, strategy="cosine", warmup_steps=1),
        TemperatureScheduler(start=3.0, end=1.0, strategy="exponential"),
    ]


def test_drives_the_loss_and_logs():
    recorder = Recorder()
    t = trainer(max_steps=5, log_every_n_steps=1, callbacks=[*schedules(), recorder])
    t.fit(make_module("soft"), loader(make_batch()))
    alpha, temperature = schedules()
    alpha.total_steps = temperature.total_steps = 5
    for step, (a, temp) in recorder.values.items():
        assert a == pytest.approx(alpha.value_at(step)) and temp == pytest.approx(temperature.value_at(step))
    assert "train/alpha" in t.callback_metrics and "train/temperature" in t.callback_metrics


@pytest.mark.slow
@pytest.mark.parametrize("technique", KINDS)
def test_resume_continues_exactly(tmp_path, technique):
    """Stopped after 3 of 6 steps and resumed: same schedule values, losses and final weights (both models
    and both parameter groups for co-distillation)."""
    batch = make_batch(padding=[(1, 2)])
    pl.seed_everything(0)
    full = Recorder()
    uninterrupted = make_module(technique)
    trainer(max_steps=6, callbacks=[*schedules(), full]).fit(uninterrupted, loader(batch))

    pl.seed_everything(0)
    first = Recorder()
    t = trainer(max_steps=6, callbacks=[*schedules(), first, StopAt(3)])
    t.fit(make_module(technique), loader(batch))
    assert t.global_step == 3
    t.save_checkpoint(tmp_path / "stopped.ckpt")
    saved = torch.load(tmp_path / "stopped.ckpt", weights_only=False)["callbacks"]
    alpha, temperature = schedules()
    assert saved[alpha.state_key]["total_steps"] == 6 and saved[temperature.state_key]["start"] == 3.0

    second = Recorder()
    resumed = make_module(technique)
    trainer(max_steps=6, callbacks=[*schedules(), second]).fit(
        resumed, loader(batch), ckpt_path=tmp_path / "stopped.ckpt"
    )
    assert sorted(second.values) == [3, 4, 5]
    for step in range(6):
        got = (first.values | second.values)[step]
        assert got == pytest.approx(full.values[step]), f"step {step}"
    for key, value in uninterrupted.state_dict().items():  # the teacher too (trained or frozen)
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)
    assert full.losses == pytest.approx(first.losses | second.losses)


def test_state_key_names_the_attribute_and_the_state_restores_the_schedule():
    alpha, temperature = schedules()
    assert alpha.state_key == "AlphaScheduler{'attribute': 'alpha'}"
    assert temperature.state_key == "TemperatureScheduler{'attribute': 'temperature'}"
    alpha.total_steps = 10  # as resolved from the trainer when fitting starts
    assert alpha.state_dict() == {
        "start": 1.0,
        "end": 0.2,
        "strategy": "cosine",
        "warmup_steps": 1,
        "warmup_start": None,
        "total_steps": 10,
        "stages": 4,
    }
    restored = AlphaScheduler(start=0.5, strategy="step", total_steps=3)
    restored.load_state_dict(alpha.state_dict())
    assert [restored.value_at(s) for s in range(12)] == [alpha.value_at(s) for s in range(12)]
    with pytest.raises(
        ValueError, match=r"AlphaScheduler: the checkpoint's schedule state has unknown keys \['rate'\]"
    ):
        restored.load_state_dict({"start": 1.0, "rate": 2.0})
