"""StudentEMA: the average it keeps, what validation and export see, accumulation, resume and bad input."""

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import StopAt, loader, make_batch, make_module, trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy
from transformers import AutoModelForCausalLM

from lit_distill.callbacks import ExportModel, StudentEMA


def trained(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().double() for name, p in module.student.named_parameters() if p.requires_grad}


class Trajectory(Callback):
    """The student's weights after every optimizer step (by step), and what each validation saw (by step)."""

    def __init__(self):
        self.steps, self.validated = {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step:  # not after a micro-batch that stepped no optimizer yet
            self.steps[trainer.global_step] = trained(pl_module)

    def on_validation_epoch_start(self, trainer, pl_module):
        self.validated[trainer.global_step] = trained(pl_module)


def reference_ema(steps: dict[int, dict], decay: float, start: int = 1, until: int | None = None) -> dict:
    """The average written out: the first averaged step's weights, then decay * average + (1 - decay) * weights."""
    average = None
    for step in sorted(s for s in steps if start <= s <= (until or max(steps))):
        weights = steps[step]
        average = weights if average is None else {k: decay * average[k] + (1 - decay) * weights[k] for k in weights}
    return average


def assert_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


def fit(callbacks, steps=5, validate=True, batches=2, ckpt_path=None, student_dtype=torch.float32, **kwargs):
    """A seeded soft-label module trained ``steps`` steps on ``batches`` batches, validated every 2 steps."""
    pl.seed_everything(0)
    module = make_module("soft")
    module.student.to(student_dtype)
    data = [make_batch(seed=s, padding=[(1, 3)]) for s in range(batches)]
    if validate:
        kwargs = {"val_check_interval": 2, "check_val_every_n_epoch": None, "limit_val_batches": 1, **kwargs}
    t = trainer(max_steps=steps, callbacks=callbacks, **kwargs)
    t.fit(module, loader(*data), loader(data[0]) if validate else None, ckpt_path=ckpt_path)
    return module, t


def test_the_student_ends_with_the_average_of_its_trained_weights():
    trajectory = Trajectory()
    module, _ = fit([trajectory, StudentEMA(decay=0.6)])
    assert sorted(trajectory.steps) == [1, 2, 3, 4, 5]
    assert_weights(trained(module), reference_ema(trajectory.steps, 0.6))
    assert not torch.allclose(trajectory.steps[5]["lm_head.weight"], trained(module)["lm_head.weight"])


def test_validation_sees_the_average_and_training_continues_from_the_trained_weights():
    plain, with_ema = Trajectory(), Trajectory()
    fit([plain])
    fit([with_ema, StudentEMA(decay=0.6)])
    for step in plain.steps:  # the swaps around validation leave the training run as it was
        assert_weights(with_ema.steps[step], plain.steps[step])
    assert sorted(with_ema.validated) == [2, 4]
    for step, seen in with_ema.validated.items():
        assert_weights(seen, reference_ema(plain.steps, 0.6, until=step))
        assert_weights(plain.validated[step], plain.steps[step])  # without the callback: the trained weights


def test_start_step_and_decay_zero():
    trajectory = Trajectory()
    module, _ = fit([trajectory, StudentEMA(decay=0.5, start_step=3)])
    assert_weights(trained(module), reference_ema(trajectory.steps, 0.5, start=3))
    assert not torch.allclose(trained(module)["lm_head.weight"], reference_ema(trajectory.steps, 0.5)["lm_head.weight"])
    latest = Trajectory()
    module, _ = fit([latest, StudentEMA(decay=0.0)])
    assert_weights(trained(module), latest.steps[5])


def test_a_bfloat16_student_is_averaged_in_float32():
    """(1 - decay) * (weights - average) is below bfloat16's resolution for most entries: kept in bfloat16 the
    average would stall; validation's round trip must not round it either."""
    trajectory, ema = Trajectory(), StudentEMA(decay=0.9)
    module, _ = fit([trajectory, ema], student_dtype=torch.bfloat16)
    assert {t.dtype for t in ema.average.values()} == {torch.float32}
    expected = reference_ema(trajectory.steps, 0.9)
    assert_weights({k: v.double() for k, v in ema.average.items()}, expected)
    final = trained(module)  # the student holds the average, rounded to bfloat16
    for name, value in expected.items():
        torch.testing.assert_close(final[name], value.to(torch.bfloat16).double(), rtol=0, atol=0, msg=name)


def test_one_update_per_optimizer_step_under_accumulation():
    trajectory, ema = Trajectory(), StudentEMA(decay=0.6)
    module, _ = fit([trajectory, ema], steps=3, validate=False, accumulate_grad_batches=2)
    assert ema.updates == 3 and sorted(trajectory.steps) == [1, 2, 3]
    assert_weights(trained(module), reference_ema(trajectory.steps, 0.6))


def test_a_resumed_run_continues_the_average_exactly(tmp_path):
    """Saved between steps 3 and 4 (as ModelCheckpoint saves), resumed to step 6: the uninterrupted run's average.
    One batch an epoch, so that the resumed run reads the batches the whole run read."""
    whole, _ = fit([StudentEMA(decay=0.6)], steps=6, batches=1)
    saved = {}

    class SaveAt3(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3 and not saved:
                trainer.save_checkpoint(tmp_path / "step3.ckpt")
                saved["weights"] = trained(pl_module)

    fit([StudentEMA(decay=0.6), SaveAt3(), StopAt(3)], steps=6, batches=1)
    checkpoint = torch.load(tmp_path / "step3.ckpt", weights_only=False)
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("StudentEMA"))
    assert state["updates"] == 3 and state["last_step"] == 3
    stored = {k.removeprefix("student."): v.double() for k, v in checkpoint["state_dict"].items()}
    assert_weights({k: stored[k] for k in saved["weights"]}, saved["weights"])  # the trained weights, not the average

    resumed, _ = fit([StudentEMA(decay=0.6)], steps=6, batches=1, ckpt_path=tmp_path / "step3.ckpt")
    assert_weights(trained(resumed), trained(whole))


def test_export_writes_the_average(tmp_path):
    trajectory = Trajectory()
    fit([trajectory, StudentEMA(decay=0.6), ExportModel(str(tmp_path / "student"), tokenizer=False)])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    weights = {name: p.detach().double() for name, p in exported.named_parameters()}
    assert_weights(weights, reference_ema(trajectory.steps, 0.6))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"decay": 1.0}, r"decay must lie in \[0, 1\) \(0.9 weighs about the last ten steps\), got 1.0"),
        ({"decay": -0.1}, r"decay must lie in \[0, 1\) \(0.9 weighs about the last ten steps\), got -0.1"),
        ({"start_step": -1}, r"start_step must be an int >= 0, got -1"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StudentEMA(**kwargs)


def test_a_module_without_a_student_is_refused():
    class Plain(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match=r"StudentEMA averages pl_module.student, but Plain has no student module.*"):
        StudentEMA().setup(SimpleNamespace(strategy=DDPStrategy()), Plain(), "fit")


@pytest.mark.parametrize("strategy", [FSDPStrategy, ModelParallelStrategy])
def test_a_sharded_student_is_refused(strategy):
    sharded = SimpleNamespace(strategy=strategy.__new__(strategy))
    with pytest.raises(ValueError, match=r"StudentEMA needs the whole student on every process; .* shards it.*"):
        StudentEMA().setup(sharded, make_module("soft"), "fit")


def test_a_checkpoint_of_another_student_is_refused():
    ema = StudentEMA()
    ema.setup(SimpleNamespace(strategy=DDPStrategy()), make_module("soft"), "fit")
    saved = {**ema.state_dict(), "average": {"other.weight": torch.zeros(2)}}
    with pytest.raises(ValueError, match=r"the checkpoint's StudentEMA average does not match the student's.*"):
        ema.load_state_dict(saved)
