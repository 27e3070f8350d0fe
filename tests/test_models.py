"""CausalLM: random init from a config dict, local checkpoints offline, dtype and gradient checkpointing."""

import pytest
import torch
from helpers import TINY, make_batch
from torch import nn

from lit_distill import distillation_loss
from lit_distill.losses import DistillationLoss
from lit_distill.models import CausalLM, fusable_head, vocab_size
from lit_distill.modules import SoftLabelDistillation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_config_builds_a_random_model_of_that_shape():
    torch.manual_seed(0)
    model = CausalLM(config=TINY).build()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 32 and vocab_size(model) == 96
    torch.manual_seed(0)
    again = CausalLM(config=TINY).build()
    torch.testing.assert_close(model.lm_head.weight, again.lm_head.weight)  # seeded: reproducible


def test_local_path_loads_offline_with_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = CausalLM(config=TINY).build()
    model.save_pretrained(tmp_path)
    loaded = CausalLM(name_or_path=str(tmp_path), dtype="bfloat16", gradient_checkpointing=True).build()
    assert loaded.dtype == torch.bfloat16 and loaded.is_gradient_checkpointing
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight.to(torch.bfloat16))


def test_missing_hub_model_offline_names_what_was_looked_for(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"could not load a causal LM from 'no-such-org/no-such-model'.*HF_HUB_OFFLINE"):
        CausalLM(name_or_path="no-such-org/no-such-model").build()


def test_unknown_dtype():
    with pytest.raises(ValueError, match="unknown dtype"):
        CausalLM(config=TINY, dtype="float8")


@pytest.mark.parametrize(
    "transform",
    [
        {"final_logit_softcapping": 30.0},  # Gemma 2
        {"logit_scale": 0.0625},  # Cohere
        {"logits_scaling": 8.0},  # Granite
        {"output_multiplier_scale": 0.5},
    ],
    ids=lambda transform: next(iter(transform)),
)
def test_heads_that_transform_the_logits_are_not_fused(transform):
    torch.manual_seed(0)
    plain = CausalLM(config=TINY).build()
    assert fusable_head(plain) is plain.lm_head
    torch.manual_seed(0)
    transformed = CausalLM(config={**TINY, **transform}).build()
    assert fusable_head(transformed) is None


def test_only_a_linear_head_over_a_base_model_is_fused():
    assert fusable_head(nn.Linear(4, 4)) is None  # no base model to take hidden states from
    model = CausalLM(config=TINY).build()
    model.lm_head = nn.Sequential(model.lm_head)  # not a plain linear layer
    assert fusable_head(model) is None


GEMMA2 = {
    **TINY,
    "model_type": "gemma2",
    "head_dim": 8,
    "final_logit_softcapping": 0.2,  # small, so that capping changes random-init logits a lot
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize(
    ("teacher_type", "fused_linear"),
    # llama with fused_linear: only the teacher's head could be fused on its own
    [("gemma2", True), ("gemma2", False), ("llama", False), ("llama", True)],
)
def test_a_soft_capped_student_is_distilled_on_its_capped_logits(teacher_type, fused_linear):
    """Gemma 2 caps its logits after the head: a module that fused the head would distill uncapped logits."""
    torch.manual_seed(0)
    student = CausalLM(config=GEMMA2).build()
    student.lm_head.weight.data.mul_(10)  # logits of a few units, far past the cap
    teacher_config = GEMMA2 if teacher_type == "gemma2" else TINY
    teacher = CausalLM(config={**teacher_config, "hidden_size": 48}).build()
    loss = DistillationLoss(temperature=2.0, alpha=0.5)
    module = SoftLabelDistillation(student=student, teacher=teacher, loss=loss, fused_linear=fused_linear)
    batch = make_batch(padding=[(1, 3)])
    labels = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    with torch.no_grad():
        out = module.distill(batch)
        capped = student(**batch).logits[:, :-1]
        uncapped = student.model(**batch).last_hidden_state[:, :-1] @ student.lm_head.weight.T
        teacher_logits = teacher(**batch).logits[:, :-1]
    expected = distillation_loss(capped, teacher_logits, labels, temperature=2.0, alpha=0.5, reduction="sum")
    wrong = distillation_loss(uncapped, teacher_logits, labels, temperature=2.0, alpha=0.5, reduction="sum")
    assert not torch.allclose(expected.loss, wrong.loss, rtol=0.1)  # the test can tell them apart
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-5)
