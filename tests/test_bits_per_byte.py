"""val/bits_per_byte: the validation NLL over the UTF-8 bytes of the counted targets, logged by every module."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import small_text_data, tiny, trainer

from lit_distill.modules import LanguageModelTraining, SoftLabelDistillation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_text_data(tmp_path_factory.mktemp("corpus"), seq_len=16)


def reference_bits_per_byte(student, data) -> float:
    """By hand: the student's summed NLL of every next token of the validation rows, over ln 2 times the bytes of
    those tokens, each read by decoding it alone (the corpus is ASCII) and EOS, a special token, as no byte."""
    special = set(data.tokenizer.all_special_ids)
    nats, num_bytes = 0.0, 0
    with torch.no_grad():
        for row in data.val_blocks.long():
            logits = student(input_ids=row[None]).logits[0, :-1].double()
            nats += F.cross_entropy(logits, row[1:], reduction="sum").item()
            targets = [t for t in row[1:].tolist() if t not in special]
            num_bytes += sum(len(data.tokenizer.decode([t]).encode()) for t in targets)
    assert any(t in special for t in data.val_blocks.reshape(-1).tolist())  # EOS is among the targets
    return nats / (math.log(2) * num_bytes)


def test_validation_logs_bits_per_byte_of_the_held_out_text(data):
    """Reference: the same NLL and byte count computed by hand."""
    module = LanguageModelTraining(tiny(hidden=32, seed=3, vocab_size=data.vocab_size))
    metrics = trainer().validate(module, datamodule=data, verbose=False)[0]
    expected = reference_bits_per_byte(module.student, data)
    assert metrics["val/bits_per_byte"] == pytest.approx(expected, rel=1e-5)
    # the token-mean CE over the bytes per token: below CE / ln 2 when tokens average more than one byte
    assert metrics["val/bits_per_byte"] < metrics["val/student_ce"] / math.log(2)


def test_a_distillation_module_logs_it_too_and_data_without_a_tokenizer_logs_none(data):
    teacher = tiny(hidden=32, seed=5, vocab_size=data.vocab_size)
    module = SoftLabelDistillation(tiny(hidden=32, seed=3, vocab_size=data.vocab_size), teacher)
    assert "val/bits_per_byte" in trainer().validate(module, datamodule=data, verbose=False)[0]
    loader = torch.utils.data.DataLoader(data.val_set, batch_size=4)  # no data module: no tokenizer to ask
    assert "val/bits_per_byte" not in trainer().validate(module, dataloaders=loader, verbose=False)[0]
