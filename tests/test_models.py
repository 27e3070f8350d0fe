"""CausalLM: random init from a config dict, local checkpoints offline, dtype and gradient checkpointing."""

import pytest
import torch
from test_modules import TINY, make_batch, make_module

from lit_distill.models import CausalLM, vocab_size

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


def test_logit_transforming_heads_use_the_logits_path():
    module = make_module("soft")
    batch = make_batch()
    assert isinstance(module._forward(module.student, batch["input_ids"], None), tuple)  # fused
    module.student.config.final_logit_softcapping = 30.0  # e.g. Gemma 2: not a plain linear head
    assert not isinstance(module._forward(module.student, batch["input_ids"], None), tuple)
    module.fused_linear = False
    assert not isinstance(module._forward(module.teacher, batch["input_ids"], None), tuple)
