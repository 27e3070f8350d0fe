"""Cross-tokenizer batches: the collator's teacher tokens, pairs and chunks on hand-made tokenizers (every value
computed by hand), a brute-force reference from byte offsets over random texts, chat rows rendered by two
different templates, and the data modules' loaders (workers give the same batches)."""

import json
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lit_distill.data import ChatDataModule, TextDataModule
from lit_distill.data.cross_tokenizer import CrossTokenizerCollator, bytes_to_unicode, text_bytes_of, token_bytes

U = bytes_to_unicode()
TEXT = "Hello world 1234567 東👍"


def _chain(merged, vocab, merges):
    """Merges that build each token of ``merged`` left to right (its prefixes become tokens too)."""
    for token in merged:
        for k in range(2, len(token) + 1):
            if token[:k] not in vocab:
                vocab[token[:k]] = len(vocab)
                merges.append((token[: k - 1], token[k - 1]))


def hand_bytelevel(specials=("<|endoftext|>",), template=None):
    """ByteLevel BPE: "ĠHel" "lo" "Ġworld" "Ġ1234" "567" and 東 as one token, 👍 as two."""
    vocab, merges = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, []
    cjk = "".join(U[b] for b in "東".encode())
    emoji = "".join(U[b] for b in "👍".encode())
    _chain(["ĠHel", "lo", "Ġworld", "Ġ1234", "567", cjk, emoji[:2], emoji[2:]], vocab, merges)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(specials))
    out = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[0])
    out.chat_template = template
    return out


def hand_metaspace(specials=(), template=None):
    """SentencePiece-style BPE with byte fallback: "▁Hello" "▁wor" "ld", digits one by one, CJK and emoji as
    <0xNN> bytes, a dummy prefix on the first word."""
    names = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "H", *"abcdefghijklmnopqrstuvwxyz"]
    vocab, merges = {name: i for i, name in enumerate([*names, *"1234567"])}, []
    _chain(["▁Hello", "▁wor", "ld"], vocab, merges)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.add_special_tokens(["<unk>", "<s>", "</s>", *specials])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out.chat_template = template
    return out


@pytest.fixture(scope="module")
def bytelevel():
    return hand_bytelevel()


@pytest.fixture(scope="module")
def metaspace():
    return hand_metaspace()


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def pieces(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def collate_one(student, teacher, ids):
    return CrossTokenizerCollator(student, teacher)([{"input_ids": torch.tensor(ids)}])


def row(batch, key, b=0):
    value = batch[key][b]
    return value[value >= 0].tolist() if key.startswith("boundary") else value.tolist()


# ---- hand-computed rows


def test_the_tokenizations_are_the_hand_made_ones(bytelevel, metaspace):
    emoji = "".join(U[b] for b in "👍".encode())
    assert pieces(metaspace, ids_of(metaspace, TEXT)) == [
        "▁Hello", "▁wor", "ld", "▁", *"1234567", "▁", "<0xE6>", "<0x9D>", "<0xB1>", "<0xF0>", "<0x9F>", "<0x91>",
        "<0x8D>",
    ]  # fmt: skip
    assert pieces(bytelevel, ids_of(bytelevel, " " + TEXT)) == [
        "ĠHel", "lo", "Ġworld", "Ġ1234", "567", "Ġ", "".join(U[b] for b in "東".encode()), emoji[:2], emoji[2:]
    ]  # fmt: skip


def test_metaspace_student_and_bytelevel_teacher_by_hand(bytelevel, metaspace):
    """▁Hello = ĠHel+lo, ▁wor+ld = Ġworld, 1..7 one by one = Ġ1234+567, 東 in 3 fallback bytes = one token, 👍 in 4
    = two; byte ends: student 6 10 12 13 14..20 21 22..28, teacher 4 6 12 17 20 21 24 26 28."""
    out = collate_one(metaspace, bytelevel, ids_of(metaspace, TEXT))
    # the row's text is the student's bytes, its dummy prefix included (a row may start inside a document)
    assert out["teacher_input_ids"][0].tolist() == ids_of(bytelevel, " " + TEXT)
    assert out["teacher_attention_mask"][0].tolist() == [1] * 9
    assert row(out, "boundary_student") == [0, 2, 7, 10, 11, 14, 16]  # (18, 8) ends the row: no target
    assert row(out, "boundary_teacher") == [1, 2, 3, 4, 5, 6, 7]
    # group 0 (▁Hello / ĠHel lo) holds both rows' first tokens: no chunk, so teacher position 0 is -1
    assert row(out, "student_chunk") == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 4, 4, 4, 5, 5, 6, 6, -1]
    assert row(out, "teacher_chunk") == [-1, 0, 1, 2, 3, 4, 5, 6, -1]
    assert torch.equal(out["labels"], out["input_ids"]) and out["attention_mask"].all()


def test_bytelevel_student_and_sentencepiece_teacher_skip_the_dummy_prefix(bytelevel, metaspace):
    """The teacher's ▁ before "Hello" is not in the text: skipped. Student ends H1 e2 l3 lo5 Ġworld11 Ġ1234:16
    567:19 Ġ20 東23 25 27; teacher (after the prefix) ▁Hello5 ▁wor9 ld11 ▁12 13..19 ▁20 21..27."""
    out = collate_one(bytelevel, metaspace, ids_of(bytelevel, TEXT))
    assert out["teacher_input_ids"][0].tolist() == ids_of(metaspace, TEXT)
    assert pieces(metaspace, out["teacher_input_ids"][0][:1]) == ["▁Hello"]
    assert row(out, "boundary_student") == [3, 4, 5, 6, 7, 8, 9]
    assert row(out, "boundary_teacher") == [0, 2, 7, 10, 11, 14, 16]
    assert row(out, "student_chunk") == [-1, -1, -1, 0, 1, 2, 3, 4, 5, 6, -1]
    assert row(out, "teacher_chunk") == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 4, 4, 4, 5, 5, 6, 6, -1]


def test_a_row_cut_inside_a_character_at_either_end(bytelevel, metaspace):
    ids = ids_of(metaspace, TEXT)
    end = collate_one(metaspace, bytelevel, ids[:17])  # ends after F0 9F: half of 👍
    assert end["teacher_input_ids"][0].tolist() == ids_of(bytelevel, " Hello world 1234567 東")
    assert row(end, "boundary_student") == [0, 2, 7, 10, 11, 14]
    assert row(end, "student_chunk") == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 4, 4, 4, -1, -1, -1]
    start = collate_one(metaspace, bytelevel, ids[13:])  # starts at 9D B1: the end of 東
    assert pieces(bytelevel, start["teacher_input_ids"][0]) == pieces(bytelevel, ids_of(bytelevel, "👍"))
    assert (row(start, "boundary_student"), row(start, "boundary_teacher")) == ([3], [0])
    assert row(start, "student_chunk") == [-1, -1, -1, 0, 0, -1]
    assert row(start, "teacher_chunk") == [0, -1]


def test_packed_documents_bos_on_one_side_and_pad_equal_to_eos(bytelevel, metaspace):
    """<s> has no teacher token (joins group 0); </s> becomes <|endoftext|>, a zero-width pair; the student's
    dummy prefix after a special token (a document start) is skipped, so the teacher reads "Hello" (H e l lo)."""
    s = metaspace
    first = [s.bos_token_id, *ids_of(s, "Hello world"), s.eos_token_id, *ids_of(s, "Hello")]
    second = [s.bos_token_id, *ids_of(s, "Hello world"), s.eos_token_id, *ids_of(s, "Hello")[:1]]
    out = CrossTokenizerCollator(s, bytelevel)(
        [{"input_ids": torch.tensor(first)}, {"input_ids": torch.tensor(second)}]
    )
    eos = bytelevel.eos_token_id
    assert bytelevel.pad_token_id == eos
    hello = ids_of(bytelevel, "Hello")
    assert pieces(bytelevel, hello) == ["H", "e", "l", "lo"]
    expected = [*hello, *ids_of(bytelevel, " world"), eos, *hello]
    assert out["teacher_input_ids"].tolist() == [expected, expected]
    assert out["teacher_attention_mask"].tolist() == [[1] * 10, [1] * 10]
    assert row(out, "boundary_student") == [1, 3, 4] and row(out, "boundary_teacher") == [3, 4, 5]
    assert row(out, "student_chunk") == [-1, 0, 0, 1, 2, -1]
    assert row(out, "teacher_chunk") == [-1, -1, -1, 0, 1, 2, 2, 2, 2, -1]
    short = CrossTokenizerCollator(s, bytelevel)([{"input_ids": torch.tensor(first[:4])}] * 2 + [
        {"input_ids": torch.tensor(first[:4])}])  # fmt: skip
    assert short["teacher_input_ids"].shape[1] == 5  # "Hello world" then the EOS pair, nothing padded


def test_pad_equal_to_eos_is_masked_only_where_padding(bytelevel, metaspace):
    s = metaspace
    rows = [[*ids_of(s, "Hello world"), s.eos_token_id, *ids_of(s, "Hello")], ids_of(s, "Hello")]
    batch = CrossTokenizerCollator(s, bytelevel, base_collate=_pad_collate(s))(
        [{"input_ids": r, "labels": r} for r in rows]
    )
    eos = bytelevel.eos_token_id
    assert batch["teacher_input_ids"][1].tolist() == [*ids_of(bytelevel, " Hello"), *[eos] * 6]
    assert batch["teacher_attention_mask"][1].tolist() == [1, 1] + [0] * 6
    assert batch["teacher_attention_mask"][0].tolist() == [1] * 8  # the EOS inside row 0 is a token
    assert (batch["student_chunk"][1] == -1).all() or batch["student_chunk"][1, 1:].eq(-1).all()


def _pad_collate(tokenizer):
    from lit_distill.data.chat import PadCollate

    return PadCollate(tokenizer.eos_token_id)


# ---- a brute-force reference over random texts


def reference(s_ids, t_ids, s_table, t_table, s_skip, t_skip):
    """Every (p, q) whose prefixes read the same bytes, both tokens adding bytes (after the skipped ones), by
    comparing byte strings."""
    s_pre = [b"", *(text_bytes_of(s_ids[: p + 1], s_table)[s_skip:] for p in range(len(s_ids)))]
    t_pre = [b"", *(text_bytes_of(t_ids[: q + 1], t_table)[t_skip:] for q in range(len(t_ids)))]
    t_at = {t_pre[q + 1]: q for q in range(len(t_ids)) if len(t_pre[q + 1]) > len(t_pre[q])}
    return [
        (p, t_at[s_pre[p + 1]])
        for p in range(len(s_ids) - 1)
        if len(s_pre[p + 1]) > len(s_pre[p]) and s_pre[p + 1] in t_at
    ]


ALPHABET = [*"abcdefgh xyz  0123456789.,", "東", "京", "é", "👍", "🏽", "Ω", "\n"]
WORDS = "the quick brown fox jumps over lazy dog café naïve 12 345 2026 tokens bytes align, groups. Hello world!"
CORPUS = [" ".join(random.Random(i).choices(WORDS.split(), k=12)) for i in range(200)]


def trained_pair():
    """A trained ByteLevel BPE and a trained Metaspace BPE with byte fallback (no CJK or emoji in training)."""
    byte = Tokenizer(models.BPE())
    byte.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, show_progress=False)
    )
    byte.add_special_tokens(["<|endoftext|>"])
    meta = Tokenizer(models.BPE())
    meta.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"]
    meta.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=150, special_tokens=specials, show_progress=False))
    spec = json.loads(meta.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    names = [k for k, _ in learned[:3]] + [f"<0x{b:02X}>" for b in range(256)] + [k for k, _ in learned[3:]]
    spec["model"].update(vocab={k: i for i, k in enumerate(names)}, byte_fallback=True, unk_token="<unk>")
    for added in spec["added_tokens"]:
        added["id"] = names.index(added["content"])
    return (
        PreTrainedTokenizerFast(tokenizer_object=byte, eos_token="<|endoftext|>", pad_token="<|endoftext|>"),
        PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>", bos_token="<s>", eos_token="</s>"
        ),
    )


@pytest.mark.parametrize("direction", ["metaspace->bytelevel", "bytelevel->metaspace"])
def test_every_pair_reads_the_same_bytes_over_random_texts(direction):
    byte, meta = trained_pair()
    student, teacher = (meta, byte) if direction.startswith("metaspace") else (byte, meta)
    s_table, t_table = token_bytes(student), token_bytes(teacher)
    rng = random.Random(0)
    for trial in range(60):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 40)))
        full = ids_of(student, text)
        lo, hi = rng.randint(0, len(full) // 3), rng.randint(len(full) * 2 // 3, len(full))
        ids = full[lo : max(hi, lo + 1)]
        out = collate_one(student, teacher, ids)
        t_ids = out["teacher_input_ids"][0].tolist()
        data = text_bytes_of(ids, s_table)
        lead = next(i for i in range(len(data) + 1) if i == len(data) or data[i] & 0xC0 != 0x80)
        body = data[lead:].decode("utf-8", "ignore").encode()  # the cut character's bytes at the end go too
        t_data = text_bytes_of(t_ids, t_table)
        t_skip = 0 if t_data == body else 1
        assert t_data[t_skip:] == body, (trial, text)
        pairs = list(zip(row(out, "boundary_student"), row(out, "boundary_teacher"), strict=True))
        expected = reference(ids, t_ids, s_table, t_table, lead, t_skip)
        s_pre = [text_bytes_of(ids[: p + 1], s_table)[lead:] for p in range(len(ids))]
        t_pre = [text_bytes_of(t_ids[: q + 1], t_table)[t_skip:] for q in range(len(t_ids))]
        assert all(s_pre[p] == t_pre[q] for p, q in pairs), (trial, text)  # both have read the same bytes
        assert set(expected) <= set(pairs) and pairs == sorted(pairs), (trial, text)
        for p, q in set(pairs) - set(expected):  # the rest: zero-width tokens pairing up (e.g. both prefixes)
            assert s_pre[p] == (s_pre[p - 1] if p else b"") or t_pre[q] == (t_pre[q - 1] if q else b"")
        s_chunk, t_chunk = out["student_chunk"][0].numpy(), out["teacher_chunk"][0].numpy()
        for c in range(int(s_chunk.max()) + 1):  # each chunk: the same bytes on both sides
            s_tokens = [ids[p + 1] for p in np.flatnonzero(s_chunk == c)]
            t_tokens = [t_ids[q + 1] for q in np.flatnonzero(t_chunk == c)]
            assert text_bytes_of(s_tokens, s_table) == text_bytes_of(t_tokens, t_table) != b"" or not t_tokens
        assert set(t_chunk[t_chunk >= 0]) == set(s_chunk[s_chunk >= 0])


# ---- chat rows and errors

STUDENT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEACHER_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CONVERSATIONS = [
    {"messages": [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": f"question {i} how are you"},
        {"role": "assistant", "content": f"Hello world {i}23 fine 東👍"},
        {"role": "user", "content": "and then"},
        {"role": "assistant", "content": f"answer {i} thanks a lot for asking"},
    ]}
    for i in range(6)
]  # fmt: skip


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok_chat")
    student = hand_metaspace(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], STUDENT_TEMPLATE)
    teacher = hand_bytelevel(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], TEACHER_TEMPLATE)
    student.save_pretrained(root / "student")
    teacher.save_pretrained(root / "teacher")
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    return root


def chat_data(root, **kwargs):
    data = ChatDataModule(
        str(root / "chats.jsonl"), tokenizer=str(root / "student"), teacher_tokenizer=str(root / "teacher"),
        val_fraction=0, batch_size=3, cache_dir=str(root / "cache"), **kwargs,
    )  # fmt: skip
    data.setup()
    return data


def check_chat_batch(batch, data, cut=False):
    s_table, t_table = token_bytes(data.tokenizer), token_bytes(data.teacher_tokenizer)
    t_tok = data.teacher_tokenizer
    for b in range(batch["input_ids"].shape[0]):
        n, m = int(batch["attention_mask"][b].sum()), int(batch["teacher_attention_mask"][b].sum())
        ids, t_ids = batch["input_ids"][b, :n].tolist(), batch["teacher_input_ids"][b, :m].tolist()
        counted = (batch["labels"][b, :n] != -100).numpy()
        # the spans by the templates' markup: after <|assistant|>, and after "<|im_start|>assistant\n"
        s_starts = [p + 1 for p, i in enumerate(ids) if i == data.tokenizer.convert_tokens_to_ids("<|assistant|>")]
        newline = ids_of(t_tok, "\n")[0]
        im_start = t_tok.convert_tokens_to_ids("<|im_start|>")
        t_starts = []
        for q in (q for q in range(m) if t_ids[q] == im_start):
            r = next((r for r in range(q, m) if t_ids[r] == newline), m)
            if t_tok.decode(t_ids[q + 1 : r]) == "assistant" and r < m:
                t_starts.append(r + 1)
        assert t_ids[t_starts[0] - 1] == newline
        pairs = set(zip(row(batch, "boundary_student", b), row(batch, "boundary_teacher", b), strict=True))
        for a, c in zip(s_starts, t_starts, strict=False):
            if a < n and counted[a]:
                assert (a - 1, c - 1) in pairs  # the point just before each assistant span
        expected = set()
        for a, c in zip(s_starts, t_starts, strict=False):
            e = a + int(np.argmin(np.append(counted[a:], False)))  # the span's end
            f = next((q for q in range(c, m) if t_ids[q] == t_tok.convert_tokens_to_ids("<|im_end|>")), m - 1) + 1
            expected |= {(p + a, q + c) for p, q in reference(ids[a:e], t_ids[c:f], s_table, t_table, 0, 0)}
        before = {(a - 1, c - 1) for a, c in zip(s_starts, t_starts, strict=False)}
        in_spans = pairs - before
        assert in_spans == {(p, q) for p, q in expected if p + 1 < n and counted[p + 1]}
        s_chunk = batch["student_chunk"][b, :n].numpy()
        if not cut:  # every counted target is in a chunk (the spans start after position 0 on both sides)
            assert ((s_chunk[:-1] >= 0) == counted[1:]).all()
    return True


def test_chat_rows_two_templates_align_only_the_counted_turns(chat_dirs):
    data = chat_data(chat_dirs)
    batch = next(iter(data.train_dataloader()))
    assert {"teacher_input_ids", "boundary_student", "student_chunk", "teacher_chunk"} <= set(batch)
    assert check_chat_batch(batch, data)
    assert data.describe()["teacher_tokenizer"] != data.describe().get("vocab_size")


def test_chat_truncation_inside_a_turn(chat_dirs):
    data = chat_data(chat_dirs, max_seq_length=70)
    batch = next(iter(data.train_dataloader()))
    assert int(batch["attention_mask"].sum(1).max()) == 70  # cut inside the second assistant turn
    assert check_chat_batch(batch, data, cut=True)


def test_chat_errors_name_the_row(metaspace, bytelevel):
    collate = CrossTokenizerCollator(metaspace, bytelevel, base_collate=_pad_collate(metaspace))
    s_ids, t_ids = ids_of(metaspace, "Hello world"), ids_of(bytelevel, " Hello world")
    with pytest.raises(
        ValueError, match=r"row 1 of the batch: the student's rendering has 1 counted spans and the teacher's 2"
    ):
        good = {"input_ids": s_ids, "labels": s_ids, "teacher_input_ids": t_ids, "teacher_labels": t_ids}
        collate([good, {**good, "teacher_labels": [t_ids[0], -100, t_ids[2]], "labels": s_ids}])
    differ = r"row 0 of the batch, counted span 0: the student's and teacher's texts differ"
    with pytest.raises(ValueError, match=differ):
        other = ids_of(bytelevel, " Hello there")
        collate([{"input_ids": s_ids, "labels": s_ids, "teacher_input_ids": other, "teacher_labels": other}])


def test_chat_packing_and_prepared_are_refused_with_a_teacher_tokenizer(chat_dirs):
    with pytest.raises(ValueError, match=r"does not support packing=True or prepared= yet"):
        chat_data(chat_dirs, packing=True)


# ---- text data modules


@pytest.fixture(scope="module")
def text_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok_text")
    with open(root / "works.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"text": f"Work {i}. " + " ".join(CORPUS[i * 10 : i * 10 + 10]) + " 東京 👍🏽"}) + "\n")
    return root


def text_data(root, teacher, workers=0, **kwargs):
    data = TextDataModule(
        files=[str(root / "works.jsonl")], vocab_size=300, seq_len=32, batch_size=4, val_fraction=0.34,
        cache_dir=str(root / "cache"), teacher_tokenizer=teacher, num_workers=workers, **kwargs,
    )  # fmt: skip
    data.setup()
    return data


def test_text_loader_workers_give_the_same_batches(text_root, metaspace):
    batches = []
    for workers in (0, 2):
        data = text_data(text_root, metaspace, workers)
        batches.append(list(data.val_dataloader()))
    assert len(batches[0]) == len(batches[1]) > 0
    for one, two in zip(*batches, strict=True):
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    first = batches[0][0]
    s_table, t_table = token_bytes(data.tokenizer), token_bytes(metaspace)
    ids, t_ids = first["input_ids"][0].tolist(), first["teacher_input_ids"][0][first["teacher_attention_mask"][0] > 0]
    for p, q in zip(row(first, "boundary_student"), row(first, "boundary_teacher"), strict=True):
        s_text = text_bytes_of(ids[: p + 1], s_table)
        t_text = text_bytes_of(t_ids[: q + 1].tolist(), t_table)
        assert t_text in (s_text, b" " + s_text) or t_text.lstrip(b" ") == s_text.lstrip(b" ")


def test_text_module_names_the_teacher_in_describe_and_fingerprint(text_root, metaspace, bytelevel):
    plain, one, other = text_data(text_root, None), text_data(text_root, metaspace), text_data(text_root, bytelevel)
    assert "teacher_tokenizer" not in plain.describe() and plain.collate is None
    assert one.describe()["teacher_tokenizer"] != other.describe()["teacher_tokenizer"]
    assert len({plain.fingerprint, one.fingerprint, other.fingerprint}) == 3
    assert set(next(iter(plain.val_dataloader()))) == {"input_ids"}  # no teacher: batches as before
    quick = text_data(text_root, metaspace, max_train_tokens=128)
    assert "boundary_student" in next(iter(quick.train_dataloader()))
