"""The modules' parts: rebuilding from a checkpoint, the normalizer's checks, tokens/s, schedule state."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lit_distill.callbacks import AlphaScheduler, TokensPerSecond
from lit_distill.losses import DistillationLoss
from lit_distill.models import CausalLM
from lit_distill.modules import CoDistillation, HardLabelDistillation, LanguageModelTraining, SoftLabelDistillation
from lit_distill.modules.normalization import TokenNormalizer

pytestmark = pytest.mark.slow

VOCAB = 64
CONFIG = {
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "max_position_embeddings": 32,
}


def spec() -> CausalLM:
    return CausalLM(config=dict(CONFIG))


def loader(rows: int = 4, length: int = 12) -> DataLoader:
    ids = torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(0))
    return DataLoader([{"input_ids": row} for row in ids], batch_size=2)


def fit_and_save(module: pl.LightningModule, path) -> pl.LightningModule:
    trainer = pl.Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, loader())
    trainer.save_checkpoint(path)
    return module


@pytest.mark.parametrize(
    "build",
    [
        lambda: LanguageModelTraining(spec(), vocab_size=VOCAB),
        lambda: SoftLabelDistillation(spec(), spec(), DistillationLoss(temperature=3.0, alpha=0.25), vocab_size=VOCAB),
        lambda: HardLabelDistillation(
            spec(), spec(), mode="generate", prompt_length=4, max_new_tokens=3, vocab_size=VOCAB
        ),
        lambda: CoDistillation(spec(), spec(), teacher_ce_weight=0.5, teacher_lr=1e-4, vocab_size=VOCAB),
    ],
    ids=["alone", "soft", "hard-generate", "co"],
)
def test_load_from_checkpoint_rebuilds_the_module(build, tmp_path):
    torch.manual_seed(0)
    module = fit_and_save(build(), tmp_path / "run.ckpt")
    # plain data only: the checkpoint opens without unpickling library classes
    saved = torch.load(tmp_path / "run.ckpt", weights_only=True)["hyper_parameters"]
    assert saved["_class_path"].endswith(type(module).__name__)

    loaded = type(module).load_from_checkpoint(tmp_path / "run.ckpt")
    assert type(loaded) is type(module)
    assert loaded.loss.temperature == module.loss.temperature and loaded.loss.alpha == module.loss.alpha
    for name, value in module.state_dict().items():
        if name.startswith("teacher.") and not module.teacher_trains:
            continue  # a frozen teacher is rebuilt from its spec, not stored
        torch.testing.assert_close(loaded.state_dict()[name], value, rtol=0, atol=0, msg=name)
    for attribute in ("mode", "prompt_length", "max_new_tokens", "teacher_lr"):
        assert getattr(loaded, attribute, None) == getattr(module, attribute, None)


def test_built_models_are_passed_again_when_loading(tmp_path):
    student, teacher = spec().build(), spec().build()
    module = fit_and_save(SoftLabelDistillation(student, teacher), tmp_path / "run.ckpt")
    saved = torch.load(tmp_path / "run.ckpt", weights_only=True)["hyper_parameters"]
    assert "student" not in saved and "teacher" not in saved
    loaded = SoftLabelDistillation.load_from_checkpoint(tmp_path / "run.ckpt", student=spec().build(), teacher=teacher)
    weight = "student.model.embed_tokens.weight"
    torch.testing.assert_close(loaded.state_dict()[weight], module.state_dict()[weight], rtol=0, atol=0)


def test_teacher_is_frozen_unless_it_trains():
    soft = SoftLabelDistillation(spec(), spec(), vocab_size=VOCAB)
    co = CoDistillation(spec(), spec(), vocab_size=VOCAB)
    assert soft.frozen_teacher and not co.frozen_teacher
    assert not any(p.requires_grad for p in soft.teacher.parameters())
    assert all(p.requires_grad for p in co.teacher.parameters())
    soft.train()
    assert soft.student.training and not soft.teacher.training


def test_normalizer_refuses_unknown_action_and_skip_where_it_cannot_work():
    with pytest.raises(ValueError, match="unknown on_nonfinite='drop'; choose 'raise' or 'skip'"):
        TokenNormalizer("drop")

    class Sharded:
        strategy = pl.strategies.FSDPStrategy.__new__(pl.strategies.FSDPStrategy)

    with pytest.raises(ValueError, match="on_nonfinite='skip' works on one process or with DDP, not with FSDPStrategy"):
        TokenNormalizer("skip").check_strategy(Sharded())
    TokenNormalizer("raise").check_strategy(Sharded())  # raising works everywhere


def test_tokens_per_second_is_logged_from_the_callback():
    module = LanguageModelTraining(spec(), vocab_size=VOCAB)
    assert [type(c) for c in module.configure_callbacks()] == [TokensPerSecond]
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module, loader())
    rate = float(trainer.callback_metrics["train/tokens_per_sec"])
    # 2 rows x 12 tokens per batch through a tiny model on a CPU: far above 24 tokens per second, and finite
    assert 24 < rate < float("inf")


class SlowCollate:
    """Collates like the default and sleeps: a data loader of known slowness."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, rows):
        time.sleep(self.seconds)
        return torch.utils.data.default_collate(rows)


def test_data_wait_fraction_measures_the_loader_and_not_validation():
    ids = torch.randint(0, VOCAB, (8, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": row} for row in ids]
    train = DataLoader(rows, batch_size=2, collate_fn=SlowCollate(0.15))
    val = DataLoader(rows[:2], batch_size=2, collate_fn=SlowCollate(0.5))  # must not count as waiting
    module = LanguageModelTraining(spec(), vocab_size=VOCAB)
    trainer = pl.Trainer(
        max_steps=4, val_check_interval=2, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, train, val)
    meter = next(c for c in trainer.callbacks if isinstance(c, TokensPerSecond))
    # 4 batches, each 0.15 s in the collate function (the loader prefetches one more), two validations of 0.5 s
    assert 0.6 <= meter.wait_seconds < 0.6 + 0.15 + 0.4
    # logged at the last step; the gap up to the last validation adds a little after it
    assert meter.data_wait_fraction == pytest.approx(
        float(trainer.callback_metrics["train/data_wait_fraction"]), abs=0.01
    )
    assert meter.data_wait_fraction == pytest.approx(meter.wait_seconds / (meter.wait_seconds + meter.step_seconds))
    fast = LanguageModelTraining(spec(), vocab_size=VOCAB)
    trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(fast, DataLoader(rows, batch_size=2))
    quick = next(c for c in trainer.callbacks if isinstance(c, TokensPerSecond))
    assert quick.data_wait_fraction < meter.data_wait_fraction / 2


def test_schedule_state_is_restored_by_name_and_unknown_keys_are_refused():
    schedule = AlphaScheduler(start=1.0, end=0.5, strategy="cosine", total_steps=10)
    other = AlphaScheduler(start=0.2)
    other.load_state_dict(schedule.state_dict())
    assert [other.value_at(step) for step in range(12)] == [schedule.value_at(step) for step in range(12)]
    with pytest.raises(ValueError, match=r"unknown keys \['stray'\]"):
        other.load_state_dict({**schedule.state_dict(), "stray": 1})
