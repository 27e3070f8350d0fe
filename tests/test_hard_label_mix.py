"""``HardLabelDistillation(label_weight=w)``: CE on the teacher's argmax mixed with CE on the data's labels."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import loader, make_batch, make_module, trainer

from lit_distill.kernels import fused_linear, torch_backend
from lit_distill.losses import DistillationLoss
from lit_distill.models import fusable_head

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
@pytest.mark.parametrize("w", WEIGHTS)
def test_each_model_runs_once_and_the_loss_is_called_once(w, fused):
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
    assert calls == [{"alpha": 0.0, "hard_labels": "teacher_argmax", "label_weight": w}]


def old_two_call_mix(module, batch, w):
    """What ``argmax_loss`` computed before the loss had ``label_weight``: two loss calls on the same passes,
    mixed afterwards (the argmax term left out at w=1)."""
    passes = module.forward_passes(batch)
    argmax = module.distillation_loss(passes, alpha=0.0, hard_labels="teacher_argmax")
    labels = module.distillation_loss(passes, alpha=0.0, hard_labels="labels")
    if w == 1:
        return argmax._replace(loss=labels.loss, hard=labels.hard)
    return argmax._replace(loss=(1 - w) * argmax.loss + w * labels.loss, hard=(1 - w) * argmax.hard + w * labels.hard)


@pytest.mark.parametrize("fused", PATHS, ids=["fused-linear", "logits"])
@pytest.mark.parametrize("w", [0.25, 0.5, 1.0])
def test_one_call_equals_the_old_two_call_mix(w, fused):
    module = make_module("hard-argmax", label_weight=w, fused_linear=fused, chunk_size=16)
    batch = padded_batch()
    results = []
    for compute in (module.compute_loss, lambda b: old_two_call_mix(module, b, w)):
        module.student.zero_grad()
        out = compute(batch)
        (0.37 * out.loss).backward()  # grad_output != 1
        results.append((out, {name: p.grad.clone() for name, p in module.student.named_parameters()}))
    (new, new_grads), (old, old_grads) = results
    for field in ("loss", "hard", "teacher_ce", "agreement", "num_tokens"):
        torch.testing.assert_close(getattr(new, field), getattr(old, field), rtol=2e-6, atol=1e-6, msg=field)
    for name, grad in old_grads.items():
        # fp32 sums in another order: a few ulps of the largest entry (about 1)
        torch.testing.assert_close(new_grads[name], grad, rtol=1e-5, atol=2e-6, msg=name)


@pytest.mark.parametrize("w", WEIGHTS)
def test_the_fused_linear_path_projects_each_lm_head_once_per_chunk(w, monkeypatch):
    """One pass: each model's chunk logits are projected once per chunk, whatever the mix."""
    module = make_module("hard-argmax", label_weight=w, chunk_size=16)  # 4 x 11 positions: 3 chunks
    widths = {32: "student", 48: "teacher"}  # the hidden widths of make_module's two models
    projections = {"student": 0, "teacher": 0}
    project = fused_linear.project

    def counting(hidden, weight, *args, **kwargs):
        projections[widths[weight.shape[1]]] += 1
        return project(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(fused_linear, "project", counting)
    module.compute_loss(padded_batch()).loss.backward()
    assert projections == {"student": 3, "teacher": 3}


@pytest.mark.parametrize("w", WEIGHTS)
def test_the_logits_path_runs_each_lm_head_once_and_streams_the_logits_once(w, monkeypatch):
    module = make_module("hard-argmax", label_weight=w, fused_linear=False)
    heads = {"student": 0, "teacher": 0}
    for name in heads:

        def count(*_, name=name):
            heads[name] += 1

        fusable_head(getattr(module, name)).register_forward_hook(count)
    streams = []
    stream_rows = torch_backend.stream_rows
    monkeypatch.setattr(torch_backend, "stream_rows", lambda *a, **k: streams.append(1) or stream_rows(*a, **k))
    module.compute_loss(padded_batch()).loss.backward()
    assert heads == {"student": 1, "teacher": 1}
    assert len(streams) == 1


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


def test_a_loss_label_weight_the_module_would_override_is_refused():
    loss = DistillationLoss(temperature=2.0, alpha=0.7, label_weight=0.5)
    with pytest.raises(
        ValueError,
        match=r"the loss's label_weight \(0.5\) differs from HardLabelDistillation's \(0.0\), which it would"
        r" override: set label_weight=0.5 on the module instead",
    ):
        make_module("hard-argmax", loss=loss)
    assert make_module("hard-argmax", loss=loss, label_weight=0.5).loss.label_weight == 0.5


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
