"""``HardLabelDistillation(label_weight=w)``: CE on the teacher's argmax mixed with CE on the data's labels."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import loader, make_batch, make_module, trainer

WEIGHTS = [0.0, 0.25, 0.5, 1.0]  # 0.25: a mix that is not symmetric in the two terms
PATHS = [True, False]


def padded_batch():
    """Rows 0 and 2 right-padded: their padding positions must count for nothing."""
    return make_batch(rows=4, length=12, seed=3, padding=[(0, 5), (2, 2)])


def reference_loss(module, batch, w):
    """Summed ``(1 - w) * CE(student, teacher argmax) + w * CE(student, label)`` from the full logits."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    student = module.student(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    with torch.no_grad():
        teacher = module.teacher(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    argmax = teacher.argmax(-1).masked_fill(labels == -100, -100)
    flat = student.reshape(-1, student.shape[-1])
    on_argmax = F.cross_entropy(flat, argmax.reshape(-1), reduction="sum")
    on_labels = F.cross_entropy(flat, labels.reshape(-1), reduction="sum")
    return (1 - w) * on_argmax + w * on_labels, int((labels != -100).sum())


@pytest.mark.parametrize("fused", PATHS, ids=["fused-linear", "logits"])
@pytest.mark.parametrize("w", WEIGHTS)
def test_loss_and_gradient_match_a_cross_entropy_reference(w, fused):
    module = make_module("hard-argmax", label_weight=w, fused_linear=fused)
    assert (module.fused_heads()[0] is not None) == fused  # the path under test is the one asked for
    batch = padded_batch()

    out = module.compute_loss(batch)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in module.student.named_parameters()}
    module.student.zero_grad()
    expected, tokens = reference_loss(module, batch, w)
    expected.backward()

    assert out.num_tokens.item() == tokens == 4 * 11 - 5 - 2  # padding's labels not counted
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    # hard is the per-token training objective (alpha=0: the loss is all cross-entropy)
    assert out.hard.item() == pytest.approx(expected.item() / tokens, rel=1e-5)
    for name, p in module.student.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("fused", PATHS, ids=["fused-linear", "logits"])
def test_the_mix_keeps_the_argmax_calls_statistics(fused):
    batch = padded_batch()
    pure = make_module("hard-argmax", fused_linear=fused).compute_loss(batch)
    mixed = make_module("hard-argmax", label_weight=0.5, fused_linear=fused).compute_loss(batch)
    assert mixed.agreement.item() == pure.agreement.item()
    assert mixed.teacher_ce.item() == pure.teacher_ce.item()
    assert mixed.num_tokens.item() == pure.num_tokens.item()
    assert mixed.loss.item() != pytest.approx(pure.loss.item(), rel=1e-3)


@pytest.mark.parametrize("fused", PATHS, ids=["fused-linear", "logits"])
@pytest.mark.parametrize(("w", "loss_calls"), [(0.0, 1), (0.5, 2), (1.0, 2)])
def test_each_model_runs_once_and_the_pure_form_calls_the_loss_once(w, loss_calls, fused):
    module = make_module("hard-argmax", label_weight=w, fused_linear=fused)
    forwards = {"student": 0, "teacher": 0}
    for name in forwards:

        def count(*_, name=name):
            forwards[name] += 1

        getattr(module, name).base_model.register_forward_hook(count)
    calls = []
    loss = module.distillation_loss
    module.distillation_loss = lambda *a, **k: calls.append(k) or loss(*a, **k)

    module.compute_loss(padded_batch())

    assert forwards == {"student": 1, "teacher": 1}
    assert len(calls) == loss_calls


@pytest.mark.parametrize(
    ("kind", "w", "match"),
    [
        ("hard-argmax", -0.1, r"label_weight must lie in \[0, 1\].*got -0.1"),
        ("hard-argmax", 1.5, r"label_weight must lie in \[0, 1\].*got 1.5"),
        ("hard-argmax", math.nan, r"label_weight must lie in \[0, 1\].*got nan"),
        ("hard-generate", 0.5, r"label_weight=0.5 needs mode='argmax'.*set label_weight=0 or use mode='argmax'"),
    ],
)
def test_bad_label_weights_are_refused(kind, w, match):
    with pytest.raises(ValueError, match=match):
        make_module(kind, label_weight=w)


def test_fit_with_deits_mix_trains_the_student():
    module = make_module("hard-argmax", label_weight=0.5)
    before = [p.detach().clone() for p in module.student.parameters()]
    teacher_before = [p.detach().clone() for p in module.teacher.parameters()]
    fit = trainer(max_steps=2)
    fit.fit(module, loader(padded_batch(), make_batch(seed=4)))
    assert fit.global_step == 2
    assert any(not torch.equal(a, p) for a, p in zip(before, module.student.parameters(), strict=True))
    assert all(torch.equal(a, p) for a, p in zip(teacher_before, module.teacher.parameters(), strict=True))
    assert math.isfinite(fit.callback_metrics["train/hard"].item())
