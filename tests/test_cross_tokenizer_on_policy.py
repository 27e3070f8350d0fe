"""CrossTokenizerOnPolicy: the student's continuations aligned with the teacher's tokens after generation (the
student's sampled ids kept as they are, pairs on the same bytes, hand-checked pairs and chunks of a non-canonical
sample that ends mid-character, a chat batch's own teacher prompt) and short runs on two tokenizers."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import adam, tiny, trainer
from transformers import PreTrainedTokenizerFast

from lit_distill.data import TextDataModule
from lit_distill.data.cross_tokenizer import CrossTokenizerCollator
from lit_distill.data.cross_tokenizer.token_bytes import text_bytes_of, token_bytes
from lit_distill.data.tokenizers import train_bpe
from lit_distill.demo.student_tokenizer import train_metaspace_bpe
from lit_distill.losses import DistillationLoss
from lit_distill.modules import CrossTokenizerDistillation, CrossTokenizerOnPolicy

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
CORPUS = Path(__file__).resolve().parents[1] / "lit_distill" / "assets" / "shakespeare.txt.gz"
IGNORE = -100


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A byte-level BPE teacher tokenizer (500 tokens) and a Metaspace BPE student with byte fallback (400)."""
    root = tmp_path_factory.mktemp("cross_on_policy")
    with gzip.open(CORPUS, "rt") as file:
        text = file.read()[:60_000]
    documents = [text[i : i + 1500] for i in range(0, len(text), 1500)]
    (root / "works.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    train_bpe(documents, 500, root / "cache").save_pretrained(root / "teacher-tokenizer")
    student_dir = train_metaspace_bpe(documents, 400, root / "cache")
    student = PreTrainedTokenizerFast.from_pretrained(str(student_dir))
    teacher = PreTrainedTokenizerFast.from_pretrained(str(root / "teacher-tokenizer"))
    return root, documents, student, teacher, (str(student_dir), str(root / "teacher-tokenizer"))


def _module(corpus, **kwargs):
    root, _, s, t, _ = corpus
    student, teacher = tiny(vocab_size=len(s), seed=0), tiny(hidden=48, vocab_size=len(t), seed=1)
    kwargs = {"loss": DistillationLoss(temperature=2.0, alpha=0.5), "top_k": 16, "chunk_weight": 0.5, **kwargs}
    return CrossTokenizerOnPolicy(student, teacher, s, t, cache_dir=str(root / "cache"), **kwargs)


def _spy(module, name):
    """Record what ``module.name`` returns (an instance attribute shadows the method)."""
    method, record = getattr(module, name), {}

    def wrapped(*args):
        record["out"] = method(*args)
        return record["out"]

    setattr(module, name, wrapped)
    return record


def _ids(tokenizer, pieces):
    ids = tokenizer.convert_tokens_to_ids(pieces)
    assert None not in ids and tokenizer.unk_token_id not in ids, pieces
    return ids


def test_pairs_read_the_same_bytes_and_the_student_keeps_its_sampled_ids(corpus):
    _, documents, s, t, _ = corpus
    module = _module(corpus, prompt_length=6, max_new_tokens=16, seed=3)
    s_table, t_table = token_bytes(s), token_bytes(t)
    high_bytes = [i for i in range(len(s)) if s.convert_ids_to_tokens(i).startswith("<0x") and s_table[i][0] >= 0x80]
    module.student.generation_config.suppress_tokens = high_bytes  # a random student: mostly valid UTF-8 text
    rows = [{"input_ids": torch.tensor(s(d)["input_ids"][:20])} for d in documents[:4]]
    batch = CrossTokenizerCollator(s, t)(rows)
    generated, cross = _spy(module, "generate"), _spy(module, "on_policy_batch")
    seen = []
    module.student.register_forward_hook(lambda m, a, kw, out: seen.append(kw["input_ids"]), with_kwargs=True)
    out = module.compute_loss(batch)
    generated, cross = generated["out"], cross["out"]
    # the student is scored on its ids as sampled, which its tokenizer would not always produce
    assert torch.equal(seen[-1], generated["input_ids"]) and torch.equal(cross["input_ids"], generated["input_ids"])
    assert torch.equal(cross["labels"], generated["labels"])
    counted = generated["labels"] != IGNORE
    ids, t_ids = generated["input_ids"], cross["teacher_input_ids"]
    reencoded = 0
    pairs = 0
    for b in range(4):
        start, n = int(counted[b].int().argmax()), int(generated["attention_mask"][b].sum())
        gen = ids[b, start:n].tolist()
        text = text_bytes_of(gen, s_table).decode("utf-8", errors="ignore")
        reencoded += s(text, add_special_tokens=False)["input_ids"] != gen
        b_s, b_t = cross["boundary_student"][b], cross["boundary_teacher"][b]
        b_s, b_t = b_s[b_s >= 0].tolist(), b_t[b_t >= 0].tolist()
        assert b_s[0] == start - 1  # the point just before the generated span: both have read the prompt
        t_start = b_t[0] + 1
        prompt_s = text_bytes_of(ids[b, :start].tolist(), s_table)
        assert prompt_s == text_bytes_of(
            t_ids[b, :t_start].tolist(), t_table
        )  # the teacher's tokens of the prompt's text (this student adds no prefix here)
        for ps, pt in zip(b_s, b_t, strict=True):
            assert start - 1 <= ps < n - 1 and bool(counted[b, ps + 1])
            assert text_bytes_of(ids[b, start : ps + 1].tolist(), s_table) == text_bytes_of(
                t_ids[b, t_start : pt + 1].tolist(), t_table
            )
        pairs += len(b_s)
    assert reencoded >= 1 and pairs >= 4 * 4
    assert math.isfinite(float(out.loss)) and int(out.num_tokens) == int(counted[:, 1:].sum())
    # the sampled tokens between pairs are no labels either: scored as off-policy text with alpha 1, the same
    # batch adds exactly their cross-entropy
    labels = cross["labels"][:, 1:]
    paired = torch.zeros_like(labels, dtype=torch.bool)
    for b in range(4):
        paired[b, cross["boundary_student"][b][cross["boundary_student"][b] >= 0]] = True
    unpaired = (labels != IGNORE) & ~paired
    with torch.no_grad():
        logits = module.student(input_ids=cross["input_ids"], attention_mask=cross["attention_mask"]).logits[:, :-1]
        label_ce = torch.nn.functional.cross_entropy(logits[unpaired], labels[unpaired], reduction="sum")
        module.loss.alpha = 1.0
        as_text = CrossTokenizerDistillation.compute_loss(module, cross)
    assert unpaired.any()
    torch.testing.assert_close(as_text.loss - out.loss, label_ce, rtol=1e-4, atol=1e-4)


def test_a_non_canonical_sample_ending_mid_character_pairs_by_hand(corpus):
    """The student spells ' the' as '▁' 't' 'h' 'e', 'é' as two byte pieces, and stops inside '—' (two of its
    three bytes); a second row ends with EOS. The teacher reads ' the' 'Ã' '©' (byte-level) and its EOS."""
    _, _, s, t, _ = corpus
    module = _module(corpus, prompt_length=4, max_new_tokens=8)
    prompt = s("To be", add_special_tokens=False)["input_ids"]
    spelled = _ids(s, ["▁", "t", "h", "e"])
    rows = [prompt + spelled + _ids(s, ["<0xC3>", "<0xA9>", "<0xE2>", "<0x80>"]), prompt + spelled + [s.eos_token_id]]
    size, width, p = len(rows), len(rows[0]), len(prompt)
    ids = torch.full((size, width), s.pad_token_id)
    mask = torch.zeros(size, width, dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, : len(row)], mask[b, : len(row)] = torch.tensor(row), 1
    labels = torch.where((mask == 1) & (torch.arange(width) >= p), ids, IGNORE)
    stub = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    module.generate = lambda batch: stub
    cross = _spy(module, "on_policy_batch")
    batch = {"input_ids": ids.clone(), "attention_mask": torch.ones_like(ids)}  # a text batch: prompt_length 4
    out = module.compute_loss({**batch, **CrossTokenizerCollator(s, t)(_rows(ids))})
    cross = cross["out"]
    t_prompt = t(" To be", add_special_tokens=False)["input_ids"]  # the student's row starts with its '▁'
    q = len(t_prompt)
    assert t.convert_ids_to_tokens(t(" theé", add_special_tokens=False)["input_ids"]) == ["Ġthe", "Ã", "©"]
    the, a, c = _ids(t, ["Ġthe", "Ã", "©"])
    assert torch.equal(cross["input_ids"], ids) and torch.equal(cross["labels"], labels)  # as generated
    # row 0's teacher text stops first and its last token is paired: its padding follows (the loss reads 0..Tt-2)
    assert cross["teacher_input_ids"][0].tolist() == [*t_prompt, the, a, c, t.pad_token_id]
    assert cross["teacher_input_ids"][1, : q + 2].tolist() == [*t_prompt, the, t.eos_token_id]
    assert cross["teacher_attention_mask"].sum(1).tolist() == [q + 4, q + 2]
    # row 0: groups close after 'e'/' the', after the first byte of é / 'Ã', after é / '©'; the cut '—' is in none
    assert _listed(cross["boundary_student"][0]) == [p - 1, p + 3, p + 4, p + 5]
    assert _listed(cross["boundary_teacher"][0]) == [q - 1, q, q + 1, q + 2]
    chunks = [-1] * (p - 1) + [0, 0, 0, 0, 1, 2] + [-1] * 3
    assert cross["student_chunk"][0].tolist() == chunks
    assert cross["teacher_chunk"][0].tolist() == [-1] * (q - 1) + [0, 1, 2, -1, -1]
    # row 1: the EOS pairs with the teacher's (zero-width, same offset): ' the' predicts the end on both sides
    assert _listed(cross["boundary_student"][1]) == [p - 1, p + 3]
    assert _listed(cross["boundary_teacher"][1]) == [q - 1, q]
    assert cross["student_chunk"][1].tolist() == [-1] * (p - 1) + [0, 0, 0, 0, 1] + [-1] * 4
    assert cross["teacher_chunk"][1].tolist() == [-1] * (q - 1) + [0, 1, -1, -1, -1]
    assert math.isfinite(float(out.loss)) and int(out.num_tokens) == 8 + 5


def _rows(ids):
    return [{"input_ids": row} for row in ids]


def _listed(row):
    return row[row >= 0].tolist()


def test_a_chat_batch_gives_the_teacher_its_own_prompt(corpus):
    _, _, s, t, _ = corpus
    module = _module(corpus, max_new_tokens=4)
    prompt = s("To be", add_special_tokens=False)["input_ids"]
    p, t_prompt = len(prompt), t("<user> To be <bot>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + _ids(s, ["▁o", "r"])])
    batch = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "prompt_mask": torch.arange(ids.shape[1]) < p,
        "teacher_input_ids": torch.tensor([t_prompt + t(" or", add_special_tokens=False)["input_ids"]]),
        "boundary_student": torch.tensor([[p - 1]]), "boundary_teacher": torch.tensor([[len(t_prompt) - 1]]),
    }  # fmt: skip
    generated = torch.tensor([prompt + _ids(s, ["▁", "t", "h", "e"])])
    stub = {"input_ids": generated, "attention_mask": torch.ones_like(generated), "labels": generated.clone()}
    stub["labels"][:, :p] = IGNORE
    cross = module.on_policy_batch(batch, stub)
    assert cross["teacher_input_ids"][0].tolist() == t_prompt + t(" the", add_special_tokens=False)["input_ids"]
    assert _listed(cross["boundary_student"][0])[0] == p - 1
    assert _listed(cross["boundary_teacher"][0])[0] == len(t_prompt) - 1
    with pytest.raises(ValueError, match="teacher's prompt cannot be found"):
        module.on_policy_batch({**batch, "boundary_student": torch.tensor([[-1]])}, stub)


def test_prompt_only_batches_need_lmbda_one(corpus):
    module = _module(corpus, lmbda=0.5)
    ids = torch.tensor([[0, 5, 6, 7]])
    mask = torch.tensor([[0, 1, 1, 1]])
    with pytest.raises(ValueError, match="prompt-only batches"):
        module.compute_loss({"input_ids": ids, "attention_mask": mask, "prompt_mask": mask.bool()})


@pytest.mark.parametrize("lmbda", [1.0, 0.5])
def test_a_short_run_on_two_tokenizers(corpus, lmbda):
    root, _, _, _, (student_dir, teacher_dir) = corpus
    data = TextDataModule(
        files=[str(root / "works.jsonl")], tokenizer=student_dir, teacher_tokenizer=teacher_dir, seq_len=24,
        batch_size=4, val_fraction=0.25, cache_dir=str(root / "cache"),
    )  # fmt: skip
    module = _module(corpus, lmbda=lmbda, prompt_length=8, max_new_tokens=8, seed=1, optimizer=adam)
    run = trainer(max_steps=4, val_check_interval=4, limit_val_batches=1)
    run.fit(module, data)
    metrics = run.callback_metrics
    assert math.isfinite(float(metrics["train/loss"])) and math.isfinite(float(metrics["val/loss"]))
    fraction = float(metrics["train/on_policy_fraction"])
    assert fraction == 1.0 if lmbda == 1.0 else 0.0 < fraction < 1.0
    assert module.counts["on_policy"] == round(fraction * 4) and np.isfinite(module.counts["generation_s"])
