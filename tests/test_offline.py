"""OfflineDistillation: the loss on a cached teacher signal (against the float64 oracle), training from a
teacher cache, and what it refuses."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from helpers import InterruptAt, adam, small_text_data, tiny, trainer
from lightning.pytorch.callbacks import Callback
from oracle import sparse_oracle

from lit_distill.callbacks import CheckpointOnInterrupt, TemperatureScheduler
from lit_distill.data.teacher_cache import TeacherCacheDataModule, TeacherSignal, cache_teacher, sparse_signal
from lit_distill.losses import DistillationLoss
from lit_distill.modules import OfflineDistillation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def cached_batch(method="topk", slots=8, temperature=2.0):
    """A batch with a teacher's signal, as a TeacherCacheDataModule yields it."""
    teacher = tiny(hidden=48, seed=1).eval()
    input_ids = torch.randint(3, 96, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = teacher(input_ids=input_ids).logits * 3  # sharper than a random model's
    ids, logprobs = sparse_signal(
        logits, method=method, k=slots, temperature=temperature, generator=torch.Generator().manual_seed(1)
    )
    return {"input_ids": input_ids, "teacher_ids": ids, "teacher_logprobs": logprobs.half().float()}


@pytest.mark.parametrize(("tail", "divergence", "method"), [(True, "forward_kl", "topk"), (True, "jsd", "topk"),
                                                            (False, "forward_kl", "sampled")])  # fmt: skip
@pytest.mark.parametrize("fused", [True, False])
def test_loss_and_gradient_match_the_oracle_on_the_shifted_signal(tail, divergence, method, fused):
    batch = cached_batch(method)
    loss = DistillationLoss(divergence=divergence, temperature=2.0, alpha=0.6)
    module = OfflineDistillation(tiny(hidden=32, seed=0), loss=loss, tail=tail, fused_linear=fused)
    out = module.compute_loss(batch)
    out.loss.backward()
    head = module.student.get_output_embeddings().weight
    # Reference: the student's logits in float64, position t against the signal of position t (token t+1).
    reference = tiny(hidden=32, seed=0).double()
    logits = reference(input_ids=batch["input_ids"]).logits[:, :-1]
    expected, stats = sparse_oracle(
        logits, batch["teacher_ids"][:, :-1], batch["teacher_logprobs"][:, :-1], batch["input_ids"][:, 1:],
        tail=tail, divergence_name=divergence, temperature=2.0, alpha=0.6, reduction="sum",
    )  # fmt: skip
    expected.backward()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.soft.double(), stats["soft"], rtol=1e-5, atol=1e-6)
    assert int(out.num_tokens) == stats["num_tokens"] == 4 * 11
    ref_head = reference.get_output_embeddings().weight.grad
    torch.testing.assert_close(head.grad.double(), ref_head, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.4])
@pytest.mark.parametrize("fused", [True, False])
def test_positions_without_a_stored_token_train_on_their_label_at_full_weight(alpha, fused):
    """A cross-tokenizer cache leaves the positions between boundaries empty: there the label stands in for the
    teacher, CE at weight 1 (``alpha`` of it beside the loss's own ``1 - alpha``), against a float64 reference."""
    batch = cached_batch()
    empty = torch.zeros(4, 12, dtype=torch.bool)
    empty[0, [1, 4]], empty[2, 7], empty[3, 0] = True, True, True
    batch["teacher_ids"] = batch["teacher_ids"].masked_fill(empty[..., None], -1)
    batch["teacher_logprobs"] = batch["teacher_logprobs"].masked_fill(empty[..., None], float("-inf"))
    loss = DistillationLoss(temperature=2.0, alpha=alpha)
    module = OfflineDistillation(tiny(hidden=32, seed=0), loss=loss, fused_linear=fused)
    out = module.compute_loss(batch)
    out.loss.backward()
    reference = tiny(hidden=32, seed=0).double()
    logits = reference(input_ids=batch["input_ids"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:]
    kept = ~empty[:, :-1]
    sparse, _ = sparse_oracle(
        logits[kept][None], batch["teacher_ids"][:, :-1][kept][None], batch["teacher_logprobs"][:, :-1][kept][None],
        labels[kept][None], tail=True, divergence_name="forward_kl", temperature=2.0, alpha=alpha, reduction="sum",
    )  # fmt: skip
    label_ce = torch.nn.functional.cross_entropy(logits[~kept], labels[~kept], reduction="sum")
    expected = sparse + label_ce
    expected.backward()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-5)
    head = module.student.get_output_embeddings().weight.grad
    torch.testing.assert_close(head.double(), reference.get_output_embeddings().weight.grad, rtol=1e-4, atol=1e-6)


def test_refuses_what_it_cannot_compute():
    with pytest.raises(
        ValueError, match="tail=False renormalizes the stored probabilities, which only forward_kl can compare"
    ):
        OfflineDistillation(tiny(), loss=DistillationLoss(divergence="reverse_kl"), tail=False)
    with pytest.raises(ValueError, match="has no teacher logits"):
        OfflineDistillation(tiny(), loss=DistillationLoss(hard_labels="teacher_argmax", alpha=0.5))
    module = OfflineDistillation(tiny())
    with pytest.raises(ValueError, match="needs batches with teacher_ids"):
        module.compute_loss({"input_ids": torch.randint(3, 96, (2, 8))})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    data = small_text_data(root)
    signal = TeacherSignal(tiny(hidden=48, seed=1, vocab_size=data.vocab_size), k=8, temperature=2.0)
    cache_teacher(signal, data, root / "cache-topk", shard_sequences=6, trainer=trainer(use_distributed_sampler=False))
    return data, root / "cache-topk"


def test_trains_from_a_teacher_cache(cache):
    data, directory = cache
    loss = DistillationLoss(temperature=2.0, alpha=0.5)
    module = OfflineDistillation(tiny(vocab_size=data.vocab_size), loss=loss, optimizer=adam)
    cached = TeacherCacheDataModule(str(directory), batch_size=4)
    before = module.validation_output(next(iter(cached.val_dataloader())))
    fit = trainer(max_steps=12, val_check_interval=6, limit_val_batches=2)
    fit.fit(module, cached)
    after = module.validation_output(next(iter(cached.val_dataloader())))
    assert fit.global_step == 12
    assert after.hard < before.hard - 0.5  # the student learned the text from the teacher's signal
    assert "val/student_ce" in fit.callback_metrics and "train/soft" in fit.logged_metrics


def test_a_cache_at_another_temperature_is_refused_at_setup(cache):
    data, directory = cache
    module = OfflineDistillation(tiny(vocab_size=data.vocab_size), loss=DistillationLoss(temperature=1.0))
    with pytest.raises(
        ValueError, match=r"the teacher cache holds log-probabilities at temperature 2\.0, the loss is at 1\.0"
    ):
        trainer(max_steps=1).fit(module, TeacherCacheDataModule(str(directory)))


def test_a_temperature_schedule_is_refused_with_a_cache(cache):
    data, directory = cache
    module = OfflineDistillation(tiny(vocab_size=data.vocab_size), loss=DistillationLoss(temperature=2.0))
    schedule = TemperatureScheduler(start=2.0, end=1.0)
    with pytest.raises(ValueError, match="a TemperatureScheduler cannot run with a teacher cache"):
        trainer(max_steps=1, callbacks=[schedule]).fit(module, TeacherCacheDataModule(str(directory)))


class SeenBatches(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, batch["input_ids"][:, :4].tolist()))


@pytest.mark.slow
def test_ctrl_c_and_resume_continue_exactly_on_the_cache(cache, tmp_path):
    """A run stopped at step 3 and resumed trains on the uninterrupted run's batches, in its order, to its weights."""
    data, directory = cache

    def run(callbacks, ckpt_path=None):
        pl.seed_everything(0)
        module = OfflineDistillation(
            tiny(vocab_size=data.vocab_size), loss=DistillationLoss(temperature=2.0, alpha=0.5), optimizer=adam
        )
        fit = trainer(max_steps=6, limit_val_batches=0, default_root_dir=tmp_path, callbacks=callbacks)
        fit.fit(module, TeacherCacheDataModule(str(directory), batch_size=4), ckpt_path=ckpt_path)
        return module

    full = SeenBatches()
    uninterrupted = run([full])
    first, second = SeenBatches(), SeenBatches()
    with pytest.raises(SystemExit):
        run([first, CheckpointOnInterrupt(dirpath=str(tmp_path)), InterruptAt(3)])
    resumed = run([second], ckpt_path=tmp_path / "interrupted.ckpt")
    assert first.seen + second.seen == full.seen and len(full.seen) == 6
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)
