"""Packing: several conversations per row (``lit_distill/data/packing.py``, ``ChatDataModule(packing=True)``) and
the modules' block-diagonal causal mask (``lit_distill/modules/attention.py``).

The oracle for the models is the same documents run one by one, unpadded, with no mask at all: a packed row must
give each document the logits it gets alone. The packing functions are checked against hand-computed rows.
"""

import itertools
import json

import lightning.pytorch as pl
import pytest
import torch
from helpers import CHAT_WORDS, adam, assert_soft_label_fits, save_chat_tokenizers, tiny, trainer

from lit_distill.data import ChatDataModule
from lit_distill.data.chat import PadCollate
from lit_distill.data.packing import PackedRows, pack_lengths, restarting_positions
from lit_distill.losses import DistillationLoss
from lit_distill.models import fusable_head
from lit_distill.modules import (
    HardLabelDistillation,
    LanguageModelTraining,
    OnPolicyDistillation,
    SoftLabelDistillation,
)
from lit_distill.modules.attention import attention_inputs, packed_causal_mask
from lit_distill.modules.distillation import _forward

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

LENGTHS = [7, 5, 9]  # three documents in one row of 24: 21 tokens, 3 of padding
TOL = 1e-5  # fp32: packed against alone


# -------------------------------------------------------------------------------------------- packing functions
def test_best_fit_decreasing_rows_against_a_hand_computed_packing():
    # Decreasing: 9 (i2) opens row 0 (room 1); 7 (i0) opens row 1 (room 3); 5 (i1) opens row 2 (room 5);
    # 4 (i4) fits row 2 tightest (room 1); 3 (i3) fills row 1 (room 0); 1 (i5) fills row 0.
    lengths = [7, 5, 9, 3, 4, 1]
    rows = pack_lengths(lengths, capacity=10)
    assert rows == [[2, 5], [0, 3], [1, 4]]
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # every one exactly once
    assert all(sum(lengths[i] for i in row) <= 10 for row in rows)
    assert pack_lengths([], 4) == []
    with pytest.raises(ValueError, match=r"every length must lie in \[1, 4\]"):
        pack_lengths([3, 5], 4)


def test_position_ids_restart_and_first_labels_are_ignored():
    assert restarting_positions([3, 2], total=7).tolist() == [0, 1, 2, 0, 1, 2, 3]
    dataset = [
        {"input_ids": [10, 11, 12], "labels": [10, 11, 12]},
        {"input_ids": [20, 21], "labels": [-100, 21]},
        {"input_ids": [30, 31, 32, 33], "labels": [-100, -100, 32, 33]},
    ]
    packed = PackedRows(dataset, [3, 2, 4], capacity=6)
    assert packed.rows == [[1, 2], [0]]  # 4 opens a row, 3 does not fit beside it, 2 does
    rows = [packed[i] for i in range(len(packed))]
    assert rows[0]["input_ids"].tolist() == [20, 21, 30, 31, 32, 33]
    assert rows[0]["labels"].tolist() == [-100, 21, -100, -100, 32, 33]
    assert rows[0]["position_ids"].tolist() == [0, 1, 0, 1, 2, 3]
    assert rows[1]["labels"].tolist() == [-100, 11, 12]  # a conversation's first token is never a target
    batch = PadCollate(pad_id=0)(rows)
    assert batch["input_ids"][1].tolist() == [10, 11, 12, 0, 0, 0]
    assert batch["labels"][1].tolist() == [-100, 11, 12, -100, -100, -100]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]  # padding continues
    assert "prompt_mask" not in batch  # a packed row has several prompts


def test_the_mask_against_a_hand_written_one():
    mask = packed_causal_mask(torch.tensor([[0, 1, 0, 1, 2]]), torch.tensor([[1, 1, 1, 1, 0]]), torch.float32)
    allowed = [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],  # padding continuing the count joins the last document (its output is never counted)
    ]
    minimum = torch.finfo(torch.float32).min
    assert mask.shape == (1, 1, 5, 5) and mask.dtype == torch.float32
    assert mask[0, 0].tolist() == [[0.0 if a else minimum for a in row] for row in allowed]
    # Padding at position 0 (a row of padding only, say) starts documents of its own: each attends to itself alone,
    # so no softmax row is all masked.
    alone = packed_causal_mask(torch.tensor([[0, 1, 0, 0]]), torch.tensor([[1, 1, 0, 0]]), torch.bfloat16)
    assert (alone[0, 0] == 0).tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]


# ---------------------------------------------------------------------------------------- packed against alone
def packed_row():
    """(three documents, their packed row of 24: input_ids, attention_mask, position_ids)."""
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 96, (n,), generator=gen) for n in LENGTHS]
    used = sum(LENGTHS)
    ids = torch.zeros(1, 24, dtype=torch.long)
    ids[0, :used] = torch.cat(docs)
    mask = (torch.arange(24) < used).long()[None]
    positions = torch.as_tensor(restarting_positions(LENGTHS, total=24))[None]
    return docs, ids, mask, positions


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused-hidden"])
def test_packed_rows_give_each_document_its_own_outputs(attention, fused):
    """The distillation forward (``_forward``: logits, or the hidden states the fused-linear loss reads) of a
    packed row against each document alone; and the same row with ``position_ids`` but a 2-D mask, which leaks."""
    model = tiny(attn_implementation=attention).eval()
    assert model.config._attn_implementation == attention
    docs, ids, mask, positions = packed_row()
    head = fusable_head(model) if fused else None
    assert fused == (head is not None)

    def out(output):
        return output[0] if fused else output.logits

    used = sum(LENGTHS)
    with torch.no_grad():
        alone = torch.cat([out(_forward(model, head, d[None], None))[0] for d in docs])
        packed = out(_forward(model, head, ids, mask, positions))[0, :used]
        plain = model.base_model if fused else model
        leaky = plain(input_ids=ids, attention_mask=mask, position_ids=positions)
        leaky = (leaky.last_hidden_state if fused else leaky.logits)[0, :used]
    assert (packed - alone).abs().max() < TOL
    # position_ids alone do not isolate the documents: the first is right, the later ones attend to it.
    assert (leaky[: LENGTHS[0]] - alone[: LENGTHS[0]]).abs().max() < TOL
    assert (leaky - alone).abs().max() > 1e-2


def test_a_bf16_model_takes_the_mask_in_its_dtype_without_nan():
    model = tiny().to(torch.bfloat16).eval()
    _, ids, mask, positions = packed_row()
    masks = attention_inputs(model, mask, positions)
    assert masks["attention_mask"].dtype == torch.bfloat16
    with torch.no_grad():
        logits = model(input_ids=ids, **masks).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", ["soft-logits", "soft-fused", "language-model"])
def test_the_loss_of_a_packed_row_is_the_sum_over_its_conversations(kind):
    """A packed row (each conversation's first label -100) against the same conversations one per padded row:
    the same counted tokens, the same summed loss (SoftLabelDistillation's forward passes, both paths, and the
    base module's plain forward)."""
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 96, (n,), generator=gen) for n in LENGTHS]
    labels = [d.clone() for d in docs]
    for label in labels:
        label[:2] = -100  # a prompt of two tokens
    rows = [{"input_ids": d.tolist(), "labels": lab.tolist()} for d, lab in zip(docs, labels, strict=True)]
    packed = PadCollate(pad_id=0)(list(PackedRows(rows, LENGTHS, capacity=24)))
    padded = PadCollate(pad_id=0)(rows)
    assert "position_ids" in packed and "position_ids" not in padded and packed["input_ids"].shape[0] == 1
    pl.seed_everything(0)
    if kind == "language-model":
        module = LanguageModelTraining(student=tiny())
    else:
        loss = DistillationLoss(temperature=2.0, alpha=0.7)
        module = SoftLabelDistillation(tiny(), tiny(hidden=48, seed=1), loss=loss, fused_linear=kind == "soft-fused")
    with torch.no_grad():
        one, many = module.compute_loss(packed), module.compute_loss(padded)
    assert int(one.num_tokens) == int(many.num_tokens) == sum(n - 2 for n in LENGTHS)  # two prompt labels each
    torch.testing.assert_close(one.loss, many.loss, rtol=1e-6, atol=TOL)  # measured: 1.9e-6 apart on 20.7


@pytest.mark.parametrize("fused", [False, True])
def test_offline_distillation_on_a_packed_row_is_the_sum_over_its_conversations(fused):
    """OfflineDistillation reads position_ids: a packed row with each conversation's cached signal (the teacher run
    on it alone) has the loss of the same conversations one per padded row; with the mask ignored it differs."""
    from lit_distill.data.teacher_cache import sparse_signal
    from lit_distill.modules import OfflineDistillation

    gen = torch.Generator().manual_seed(2)
    docs = [torch.randint(3, 96, (n,), generator=gen) for n in LENGTHS]
    teacher = tiny(hidden=48, seed=1).eval()
    with torch.no_grad():
        signals = [sparse_signal(teacher(input_ids=d[None]).logits[0] * 20, method="topk", k=6) for d in docs]
    rows = [
        {"input_ids": d.tolist(), "labels": d.tolist(), "teacher_ids": ids, "teacher_logprobs": lp}
        for d, (ids, lp) in zip(docs, signals, strict=True)
    ]

    def with_signal(batch, groups):  # the rows' signals laid out as the batch's tokens are, empty slots elsewhere
        ids = torch.full((*batch["input_ids"].shape, 6), -1)
        logprobs = torch.full((*batch["input_ids"].shape, 6), -torch.inf)
        for b, group in enumerate(groups):
            ids[b, : sum(LENGTHS[i] for i in group)] = torch.cat([rows[i]["teacher_ids"] for i in group])
            logprobs[b, : sum(LENGTHS[i] for i in group)] = torch.cat([rows[i]["teacher_logprobs"] for i in group])
        return {**batch, "teacher_ids": ids, "teacher_logprobs": logprobs}

    plain = [{k: r[k] for k in ("input_ids", "labels")} for r in rows]
    packing = PackedRows(plain, LENGTHS, capacity=24)
    packed = with_signal(PadCollate(0)(list(packing)), packing.rows)
    padded = with_signal(PadCollate(0)(plain), [[0], [1], [2]])
    module = OfflineDistillation(tiny(), loss=DistillationLoss(temperature=1.0, alpha=1.0), fused_linear=fused)
    with torch.no_grad():
        one, many = module.compute_loss(packed), module.compute_loss(padded)
        leaky = module.compute_loss({k: v for k, v in packed.items() if k != "position_ids"})
    assert int(one.num_tokens) == int(many.num_tokens) == sum(LENGTHS) - 3
    torch.testing.assert_close(one.loss, many.loss, rtol=1e-5, atol=TOL)
    assert abs(float(leaky.loss - many.loss)) > 1e-3


@pytest.mark.parametrize("fused", [False, True])
def test_packed_rows_under_bf16_autocast_match_the_padded_rows(fused):
    """precision="bf16-mixed" on a CPU: fp32 weights and mask, bf16 matmuls inside autocast. The packed row's loss
    stays the padded rows' (measured 1e-5 relative on 24.9; without the block mask the documents leak into each other
    and it is 5e-4 off)."""
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 96, (n,), generator=gen).tolist() for n in LENGTHS]
    rows = [{"input_ids": d, "labels": d} for d in docs]
    packed, padded = PadCollate(0)(list(PackedRows(rows, LENGTHS, capacity=24))), PadCollate(0)(rows)
    module = SoftLabelDistillation(
        tiny(), tiny(hidden=48, seed=1), loss=DistillationLoss(temperature=2.0, alpha=0.7), fused_linear=fused
    )
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        one, many = module.compute_loss(packed), module.compute_loss(padded)
    assert torch.isfinite(one.loss) and int(one.num_tokens) == int(many.num_tokens) == sum(LENGTHS) - 3
    torch.testing.assert_close(one.loss, many.loss, rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------- through the data
SPECIAL = ["<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
PLAIN = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
WORDS = CHAT_WORDS


def conversation(i, turns):
    messages = [{"role": "system", "content": "be nice"}]
    for t in range(turns):
        messages += [{"role": "user", "content": f"question {i} {t} how are you"},
                     {"role": "assistant", "content": f"answer {i} {t} fine thanks"}]  # fmt: skip
    return {"messages": messages}


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """(a jsonl of 12 conversations of 1 to 3 exchanges, a byte-level BPE tokenizer with the PLAIN template)."""
    root = tmp_path_factory.mktemp("packing")
    tok = save_chat_tokenizers(root, SPECIAL, {"tok": PLAIN}, adds_bos=False)["tok"]
    (root / "c.jsonl").write_text("".join(json.dumps(conversation(i, 1 + i % 3)) + "\n" for i in range(12)))
    return str(root / "c.jsonl"), tok


def make(chats, tmp_path, **kwargs):
    path, tok = chats
    data = ChatDataModule(path, tokenizer=tok, max_seq_length=64, batch_size=2, val_fraction=0.25,
                          cache_dir=str(tmp_path / "cache"), **kwargs)  # fmt: skip
    data.setup()
    return data


def test_chat_data_packs_every_training_conversation_once(chats, tmp_path):
    plain, packed = make(chats, tmp_path), make(chats, tmp_path, packing=True)
    singles = sorted((r["input_ids"].tolist(), [-100, *r["labels"][1:].tolist()]) for r in plain.train_set)
    found = []
    for row in packed.train_set:
        assert len(row["input_ids"]) <= 64
        starts = [i for i, p in enumerate(row["position_ids"].tolist()) if p == 0] + [len(row["input_ids"])]
        found += [(row["input_ids"][a:b].tolist(), row["labels"][a:b].tolist()) for a, b in itertools.pairwise(starts)]
    assert sorted(found) == singles and len(packed.train_set) < len(singles)
    assert packed.summary["train"]["packed rows"] == len(packed.train_set)
    assert make(chats, tmp_path, packing=True).train_set.rows == packed.train_set.rows  # fixed: resume is exact
    val = next(iter(packed.val_dataloader()))
    assert "position_ids" not in val and "prompt_mask" in val  # validation stays one conversation per row
    batch = next(iter(packed.train_dataloader()))
    assert {"input_ids", "labels", "attention_mask", "position_ids"} == set(batch)


def test_soft_label_distillation_fits_on_packed_chat_data(chats, tmp_path):
    data = make(chats, tmp_path, packing=True)
    assert_soft_label_fits(data)


@pytest.mark.parametrize("technique", [OnPolicyDistillation, HardLabelDistillation])
def test_techniques_that_continue_prompts_refuse_packed_data(chats, tmp_path, technique):
    data = make(chats, tmp_path, packing=True)
    student, teacher = tiny(vocab_size=data.vocab_size), tiny(hidden=48, seed=1, vocab_size=data.vocab_size)
    options = {"prompt_length": 4, "max_new_tokens": 2}
    if technique is HardLabelDistillation:
        options["mode"] = "generate"
    module = technique(student=student, teacher=teacher, optimizer=adam, **options)
    with pytest.raises(ValueError, match=rf"{technique.__name__} continues prompts.*packing=False"):
        trainer(max_steps=1).fit(module, datamodule=data)
