"""CrossTokenizerDistillation: soft-label distillation when both sides share a tokenizer (the module's wiring against
SoftLabelDistillation on one batch), a run on two tokenizers of different schemes through TextDataModule, and the
checks of the data it is given."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import adam, tiny, trainer
from transformers import PreTrainedTokenizerFast

from lit_distill.data import TextDataModule
from lit_distill.data.tokenizers import train_bpe
from lit_distill.demo.student_tokenizer import train_metaspace_bpe
from lit_distill.losses import DistillationLoss
from lit_distill.modules import CrossTokenizerDistillation, SoftLabelDistillation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
CORPUS = Path(__file__).resolve().parents[1] / "lit_distill" / "assets" / "shakespeare.txt.gz"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two tokenizers of different schemes on the same text: a byte-level BPE teacher (500 tokens) and a Metaspace
    BPE with byte fallback student (400), saved; the text as 40 documents of a jsonl file."""
    root = tmp_path_factory.mktemp("cross")
    with gzip.open(CORPUS, "rt") as f:
        text = f.read(60_000)
    documents = [text[i : i + 1500] for i in range(0, len(text), 1500)]
    (root / "works.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    teacher_dir = root / "teacher-tokenizer"
    train_bpe(documents, 500, root / "cache").save_pretrained(teacher_dir)
    student_dir = train_metaspace_bpe(documents, 400, root / "cache")
    return root, str(student_dir), str(teacher_dir)


def _cross_data(corpus, tokenizer=None) -> TextDataModule:
    """The corpus's works in the student's tokens (or ``tokenizer``'s), with the teacher's beside them."""
    root, student_dir, teacher_dir = corpus
    return TextDataModule(
        files=[str(root / "works.jsonl")], tokenizer=tokenizer or student_dir, teacher_tokenizer=teacher_dir,
        seq_len=32, batch_size=4, val_fraction=0.25, cache_dir=str(root / "cache"),
    )  # fmt: skip


def _models(student_vocab: int, teacher_vocab: int):
    return tiny(vocab_size=student_vocab, seed=0), tiny(hidden=48, vocab_size=teacher_vocab, seed=1)


def test_one_tokenizer_on_both_sides_is_soft_label_distillation(corpus):
    """Teacher ids equal to the student's and every counted position a pair: the module's loss and the student's
    gradients are SoftLabelDistillation's (dense binning, no chunk or ULD term)."""
    _, _, teacher_dir = corpus
    tokenizer = PreTrainedTokenizerFast.from_pretrained(teacher_dir)
    student, teacher = _models(len(tokenizer), len(tokenizer))
    loss = DistillationLoss(divergence="jsd", temperature=2.0, alpha=0.6)
    cross = CrossTokenizerDistillation(student, teacher, tokenizer, tokenizer, loss=loss, top_k=None)
    soft = SoftLabelDistillation(student, teacher, loss=loss, fused_linear=False)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tokenizer), (3, 14), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 10:] = 0
    positions = torch.arange(13).expand(3, 13)
    counted = torch.where(mask[:, 1:] == 1, positions, -1)
    chunks = torch.cat([counted, torch.full((3, 1), -1)], 1)
    batch = {
        "input_ids": ids, "attention_mask": mask, "labels": ids, "teacher_input_ids": ids,
        "teacher_attention_mask": mask, "boundary_student": counted, "boundary_teacher": counted,
        "student_chunk": chunks, "teacher_chunk": chunks,
    }  # fmt: skip
    ours = cross.compute_loss(batch)
    grads = torch.autograd.grad(ours.loss, list(student.parameters()))
    reference = soft.compute_loss(batch)
    expected = torch.autograd.grad(reference.loss, list(student.parameters()))
    torch.testing.assert_close(ours.loss, reference.loss, rtol=1e-5, atol=1e-5)
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert ours.num_tokens == reference.num_tokens == 3 * 13 - 4 and float(ours.boundary_share) == 1.0


def test_two_tokenizers_train_through_the_text_data_module(corpus):
    root, student_dir, teacher_dir = corpus
    data = _cross_data(corpus)
    student, teacher = _models(data.vocab_size, len(data.teacher_tokenizer))
    module = CrossTokenizerDistillation(
        student, teacher, student_dir, teacher_dir, loss=DistillationLoss(temperature=2.0, alpha=0.5), top_k=16,
        chunk_weight=0.5, uld_weight=0.2, optimizer=adam, cache_dir=str(root / "cache"),
    )  # fmt: skip
    run = trainer(max_steps=4, val_check_interval=4, limit_val_batches=2)
    run.fit(module, data)
    metrics = run.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and float(metrics["train/chunk"]) > 0
    assert 0.3 < float(metrics["train/boundary_share"]) <= 1.0  # most of the text closes a group on both sides
    # bits per byte of the student's own tokens: its cross-entropy in nats over ln 2 and the targets' bytes
    assert 1.0 < float(metrics["val/bits_per_byte"]) < 12.0
    assert math.isfinite(float(metrics["val/teacher_ce"]))


@pytest.mark.parametrize(
    ("divergence", "alpha", "temperature", "unpaired_labels"),
    [("forward_kl", 0.5, 1.0, True), ("jsd", 1.0, 2.0, True), ("reverse_kl", 0.3, 1.5, False)],
)
def test_the_fused_linear_path_is_the_logits_path(corpus, divergence, alpha, temperature, unpaired_labels):
    """top_k with the boundary term alone trains from the hidden states and the head, the student's head never
    called on the whole batch: the same loss, statistics and gradients as from the whole logits."""
    root, student_dir, teacher_dir = corpus
    data = _cross_data(corpus)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    outputs, gradients = [], []
    for fused in (True, False):
        student, teacher = _models(data.vocab_size, len(data.teacher_tokenizer))
        module = CrossTokenizerDistillation(
            student, teacher, student_dir, teacher_dir, top_k=8, fused_linear=fused, chunk_size=16,
            loss=DistillationLoss(divergence=divergence, temperature=temperature, alpha=alpha),
            cache_dir=str(root / "cache"),
        )  # fmt: skip
        module.cross_options["unpaired_labels"] = unpaired_labels
        calls = []
        student.get_output_embeddings().register_forward_hook(lambda *args, calls=calls: calls.append(1))
        outputs.append(module.compute_loss(batch))
        gradients.append(torch.autograd.grad(outputs[-1].loss, list(student.parameters())))
        assert bool(calls) is not fused
    fused, whole = outputs
    assert 0 < int(whole.boundaries) < int(whole.num_tokens)  # tokens inside chunks: the label's part is checked
    torch.testing.assert_close(fused.loss, whole.loss, rtol=1e-5, atol=1e-5)
    for name in ("soft", "hard", "agreement", "num_tokens", "boundaries"):
        torch.testing.assert_close(getattr(fused, name), getattr(whole, name), rtol=1e-5, atol=1e-6)
    for got, expected in zip(*gradients, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_data_of_another_tokenizer_is_refused_naming_both(corpus):
    root, student_dir, teacher_dir = corpus
    data = _cross_data(corpus, tokenizer=teacher_dir)
    student, teacher = _models(400, 500)
    module = CrossTokenizerDistillation(student, teacher, student_dir, teacher_dir, cache_dir=str(root / "cache"))
    with pytest.raises(ValueError, match=r"the data's tokenizer .* is not the module's student_tokenizer"):
        trainer(max_steps=1).fit(module, data)


def test_a_batch_without_the_teachers_tokens_is_refused(corpus):
    root, student_dir, teacher_dir = corpus
    student, teacher = _models(400, 500)
    module = CrossTokenizerDistillation(student, teacher, student_dir, teacher_dir, cache_dir=str(root / "cache"))
    with pytest.raises(ValueError, match="needs cross-tokenizer batches; this one lacks"):
        module.compute_loss({"input_ids": torch.ones(2, 5, dtype=torch.long)})


def test_a_pair_on_the_teacher_rows_last_token_reads_its_logits(corpus):
    """The teacher's text may stop before the student's (a character cut at the row's end): a pair on the teacher's
    last token uses the logits there (they predict what the student row still holds)."""
    _, _, teacher_dir = corpus
    tokenizer = PreTrainedTokenizerFast.from_pretrained(teacher_dir)
    student, teacher = _models(len(tokenizer), len(tokenizer))
    module = CrossTokenizerDistillation(student, teacher, tokenizer, tokenizer, top_k=None)
    ids = torch.randint(3, len(tokenizer), (1, 8), generator=torch.Generator().manual_seed(1))
    none = torch.full((1, 8), -1)
    labels = torch.full_like(ids, -100)
    labels[0, 7] = ids[0, 7]  # only the pair's target counted (another counted position would add its label's CE)
    batch = {
        "input_ids": ids, "labels": labels, "teacher_input_ids": ids[:, :7], "student_chunk": none,
        "teacher_chunk": none[:, :7], "boundary_student": torch.tensor([[6]]), "boundary_teacher": torch.tensor([[6]]),
    }  # fmt: skip
    out = module.compute_loss(batch)
    with torch.no_grad():
        s, t = student(input_ids=ids).logits[0, 6], teacher(input_ids=ids[:, :7]).logits[0, 6]
    expected = torch.sum(torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s, -1)))
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-6)
