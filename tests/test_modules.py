"""The Lightning modules on tiny random Llamas: training, frozen/trained teachers, loss identity, export,
gradient accumulation with uneven padding, checkpoints, bad input."""

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import KINDS, VOCAB, loader, make_batch, make_module, tiny, trainer, with_teacher_signal
from torch import nn

from lit_distill import distillation_loss
from lit_distill.losses import DistillationLoss
from lit_distill.models import CausalLM
from lit_distill.modules import CoDistillation, HardLabelDistillation, SoftLabelDistillation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow
def test_fits_and_the_loss_decreases(kind):
    pl.seed_everything(0)
    module = make_module(kind)
    batch = make_batch(padding=[(1, 3)])
    teacher_before = copy.deepcopy(module.teacher.state_dict())

    def current_loss():
        module.eval()
        with torch.no_grad():
            out = module.compute_loss(batch)
        return (out.loss / out.num_tokens).item()

    before = current_loss()
    trainer(max_steps=15).fit(module, loader(batch))
    after = current_loss()
    assert after < 0.8 * before, f"{kind}: loss {before:.4f} -> {after:.4f}"
    teacher_changed = any(not torch.equal(teacher_before[k], v) for k, v in module.teacher.state_dict().items())
    assert teacher_changed == (kind == "co")


@pytest.mark.parametrize("fused_linear", [True, False])
def test_module_loss_equals_the_functional_loss_on_explicit_logits(fused_linear):
    module = make_module(
        "soft", fused_linear=fused_linear, loss=DistillationLoss(divergence="jsd", alpha=0.4, temperature=1.5)
    )
    batch = make_batch(padding=[(0, 2), (3, 5)])
    out = module.distill(batch)
    logits_s = module.student(**batch).logits[:, :-1]
    logits_t = module.teacher(**batch).logits[:, :-1]
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    ref = distillation_loss(logits_s, logits_t, labels, divergence="jsd", alpha=0.4, temperature=1.5, reduction="sum")
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert out.num_tokens.item() == 4 * 11 - 2 - 5


def test_hard_argmax_targets_are_the_teachers_choice():
    module = make_module("hard-argmax")
    batch = make_batch()
    out = module.compute_loss(batch)
    logits_s = module.student(**batch).logits[:, :-1].float()
    targets = module.teacher(**batch).logits[:, :-1].argmax(-1)
    ref = F.cross_entropy(logits_s.reshape(-1, VOCAB), targets.reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-4)


def test_generate_mode_trains_only_on_generated_tokens():
    module = make_module("hard-generate")
    module.teacher.generation_config.eos_token_id = 2
    batch = make_batch(rows=3, length=10)
    sequences, labels = module.generate_targets(batch)
    assert sequences.shape == (3, 4 + 6)
    assert torch.equal(sequences[:, :4], batch["input_ids"][:, :4])
    assert bool((labels[:, :4] == -100).all())
    generated, kept = sequences[:, 4:], labels[:, 4:]
    for row in range(3):
        eos_at = (generated[row] == 2).nonzero()
        end = int(eos_at[0]) + 1 if len(eos_at) else 6
        assert torch.equal(kept[row, :end], generated[row, :end])
        assert bool((kept[row, end:] == -100).all())
    out = module.compute_loss(batch)
    logits = module.student(input_ids=sequences).logits[:, :-1]
    ref = F.cross_entropy(logits.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-4)
    assert out.num_tokens.item() == int((labels != -100).sum())


@pytest.mark.parametrize("kind", ["soft", "co"])
def test_gradient_accumulation_with_uneven_padding_equals_one_big_batch(kind):
    """Two micro-batches (one heavily padded) accumulated == one batch holding both, after one SGD step."""
    first = make_batch(rows=2, length=12, seed=3, padding=[(0, 9), (1, 1)])
    second = make_batch(rows=2, length=12, seed=4)
    both = {k: torch.cat([first[k], second[k]]) for k in first}

    def step(batches, accumulate):
        pl.seed_everything(0)
        module = make_module(kind, loss=DistillationLoss(alpha=0.6, temperature=2.0))
        module.optimizer = lambda params: torch.optim.SGD(params, lr=1.0)
        before = copy.deepcopy(module.student.state_dict())
        trainer(max_steps=1, accumulate_grad_batches=accumulate).fit(module, loader(*batches))
        return {k: before[k] - v for k, v in module.student.state_dict().items()}

    accumulated = step([first, second], accumulate=2)
    single = step([both], accumulate=1)
    # Independently: the gradient of the token-mean loss over all counted tokens of both micro-batches.
    pl.seed_everything(0)
    module = make_module(kind, loss=DistillationLoss(alpha=0.6, temperature=2.0))
    out = module.distill(both)
    (out.loss / out.num_tokens).backward()
    expected = {k: p.grad for k, p in module.student.named_parameters()}
    for key, delta in single.items():
        torch.testing.assert_close(accumulated[key], delta, rtol=1e-4, atol=1e-6, msg=key)
        torch.testing.assert_close(delta, expected[key], rtol=1e-4, atol=1e-6, msg=key)
    assert any(bool((d != 0).any()) for d in single.values())


def test_exported_student_reloads_with_the_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    module = make_module("soft")
    trainer(max_steps=2).fit(module, loader(make_batch()))
    module.save_student(str(tmp_path / "student"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    batch = make_batch(seed=9)
    module.student.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, module.student(**batch).logits)


def test_co_distillation_exports_both_trained_models(tmp_path):
    from transformers import AutoModelForCausalLM

    module = make_module("co")
    initial_teacher = copy.deepcopy(module.teacher.state_dict())
    trainer(max_steps=2).fit(module, loader(make_batch()))
    module.save_student(str(tmp_path / "s"))
    module.save_teacher(str(tmp_path / "t"))
    for name, directory in (("student", "s"), ("teacher", "t")):
        exported = AutoModelForCausalLM.from_pretrained(tmp_path / directory).state_dict()
        trained = getattr(module, name).state_dict()
        assert exported.keys() == trained.keys(), name
        for key, value in trained.items():
            torch.testing.assert_close(exported[key], value, rtol=0, atol=0, msg=f"{name}.{key}")
    exported_teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "t").state_dict()
    assert exported_teacher["model.embed_tokens.weight"].shape == (VOCAB, 48)  # the teacher, not the student
    moved = [k for k, v in initial_teacher.items() if not torch.equal(exported_teacher[k], v)]
    assert "lm_head.weight" in moved and len(moved) > len(initial_teacher) // 2, moved


@pytest.mark.slow
def test_frozen_teacher_is_left_out_of_checkpoints_and_restored(tmp_path):
    module = make_module("soft")
    t = trainer(max_steps=2, enable_checkpointing=True, default_root_dir=tmp_path)
    t.fit(module, loader(make_batch()))
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert not any(k.startswith("teacher.") for k in state) and any(k.startswith("student.") for k in state)
    fresh = make_module("soft")
    fresh.student.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    trainer(max_steps=3).fit(fresh, loader(make_batch()), ckpt_path=path)  # strict loading passes
    co = make_module("co")
    t = trainer(max_steps=1)
    t.fit(co, loader(make_batch()))
    t.save_checkpoint(tmp_path / "co.ckpt")
    assert any(k.startswith("teacher.") for k in torch.load(tmp_path / "co.ckpt", weights_only=False)["state_dict"])


def test_validation_logs_the_students_and_teachers_perplexity():
    module = make_module("soft")
    batch = make_batch(padding=[(2, 4)])
    metrics = trainer().validate(module, loader(batch), verbose=False)[0]
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    with torch.no_grad():
        logits = module.student(**batch).logits[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100).item()
    assert metrics["val/student_ce"] == pytest.approx(ce, rel=1e-4)
    assert metrics["val/student_ppl"] == pytest.approx(torch.tensor(ce).exp().item(), rel=1e-4)
    assert {"val/loss", "val/teacher_ce", "val/teacher_ppl"} <= set(metrics)


def test_training_logs_the_statistics():
    module = make_module("soft")
    t = trainer(max_steps=2, log_every_n_steps=1)
    t.fit(module, loader(make_batch()))
    assert {"train/loss", "train/soft", "train/hard", "train/agreement", "train/tokens_per_sec"} <= set(
        t.callback_metrics
    )


@pytest.mark.parametrize("kind", [*KINDS, "offline"])
def test_a_bf16_mixed_fit_trains_fp32_parameters(kind):
    # A bf16-mixed Trainer (autocast on, fp32 parameters) through each module's loss path, fused-linear included.
    module = make_module(kind)
    batch = make_batch(padding=[(1, 3)])
    batch = with_teacher_signal(batch) if kind == "offline" else batch
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer(max_steps=2, precision="bf16-mixed").fit(module, loader(batch))
    after = module.student.state_dict()
    assert all(v.dtype == torch.float32 and bool(v.isfinite().all()) for v in after.values())
    assert max(float((after[k] - v).abs().max()) for k, v in before.items()) > 1e-4


def test_bad_input():
    with pytest.raises(ValueError, match="needs a teacher"):
        SoftLabelDistillation(student=tiny())
    with pytest.raises(ValueError, match=r"student's vocabulary \(96\) differs from the teacher's \(128\)"):
        SoftLabelDistillation(student=tiny(), teacher=tiny(vocab_size=128))
    padded = SoftLabelDistillation(student=tiny(), teacher=tiny(vocab_size=128), loss=DistillationLoss(vocab_size=96))
    assert padded.loss.vocab_size == 96
    with pytest.raises(ValueError, match="exceeds"):
        SoftLabelDistillation(student=tiny(), teacher=tiny(vocab_size=128), loss=DistillationLoss(vocab_size=100))
    with pytest.raises(ValueError, match="cannot"):
        HardLabelDistillation(student=tiny(), teacher=nn.Linear(4, 4), mode="generate")
    with pytest.raises(ValueError, match="unknown mode"):
        HardLabelDistillation(student=tiny(), teacher=tiny(), mode="beam")
    with pytest.raises(ValueError, match="teacher_ce_weight > 0"):
        CoDistillation(student=tiny(), teacher=tiny(), teacher_ce_weight=0.0)
    module = make_module("soft")
    with pytest.raises(ValueError, match="must be a dict with 'input_ids'"):
        module.compute_loss({"tokens": torch.zeros(2, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="must be a dict with 'input_ids'"):
        module.compute_loss(torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of"):
        CausalLM()
    with pytest.raises(ValueError, match="model_type"):
        CausalLM(config={"vocab_size": 10})
    with pytest.raises(OSError, match="could not load a causal LM from '/nonexistent/model'"):
        CausalLM(name_or_path="/nonexistent/model").build()
