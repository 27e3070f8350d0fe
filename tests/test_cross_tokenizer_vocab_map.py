"""The vocabulary map between two tokenizers, on bytes: built against tiny tokenizers trained here (a ByteLevel BPE
teacher, a Metaspace BPE student with byte fallback that splits digits), checked against each tokenizer's own
vocabulary and its own tokenization, and against hand loops for the binning."""

from __future__ import annotations

import collections
import json
import random
import re
import shutil

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lit_distill.data.cross_tokenizer.token_bytes import bytes_to_unicode, token_bytes
from lit_distill.data.cross_tokenizer.vocab_map import DROP, build_vocabulary_map
from lit_distill.data.tokenizers import tokenizer_hash

#: the text's words, joined (ruff turns a split literal into a long list)
TEXT_WORDS = (
    "the teacher student model learns tokens from every batch while distillation keeps probability mass and"
    " vocabulary maps bytes across tokenizers during training of language models with careful evaluation"
)
#: whole tokens on both sides (checked in the tests, not assumed)
SHARED_WORDS = ("teacher", "student", "distillation", "vocabulary")
#: frequent in the teacher's text only: whole teacher tokens that the student spells in pieces
TEACHER_WORDS = ("gradient", "optimizer", "checkpoint", "scheduler", "warmup", "accumulation", "sharding")


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = []
    for n in range(400):
        words = rng.choices(TEXT_WORDS.split(), k=rng.randint(6, 14))
        year = rng.choice(("2024", "1999", "2025"))
        lines.append(f"{' '.join(words).capitalize()} in {year}, version:{year} [{year}].")
        if n % 10 == 0:
            lines.append("中文字符 中文 字符 🙂 naïve café")
    return lines


def _bytelevel_teacher(lines: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|bos|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",  # pad == eos on this side
        bos_token="<|bos|>",
        extra_special_tokens=["<|im_end|>"],
    )


def _metaspace_student(lines: list[str]) -> PreTrainedTokenizerFast:
    """SentencePiece-style: ▁ for spaces, a dummy prefix, digits split one by one, <0xNN> byte fallback."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.train_from_iterator(
        lines, trainers.BpeTrainer(vocab_size=500, min_frequency=2, special_tokens=specials, show_progress=False)
    )
    trained = json.loads(tok.to_str())["model"]
    # the SentencePiece layout: specials, then the 256 byte pieces, then the learned pieces
    pieces = [p for p, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]) if p not in specials]
    vocab = {p: i for i, p in enumerate([*specials, *(f"<0x{b:02X}>" for b in range(256)), *pieces])}
    merges = [tuple(m) for m in trained["merges"]]
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    out.pre_tokenizer = pre
    out.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    out.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=out, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@pytest.fixture(scope="module")
def pair():
    lines, extra = _corpus(), ["The " + " ".join(TEACHER_WORDS)]
    return _bytelevel_teacher(lines + 40 * extra), _metaspace_student(lines + extra)


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def _first_piece(student, text: str) -> int:
    return student(text, add_special_tokens=False)["input_ids"][0]


@pytest.mark.parametrize("side", [0, 1], ids=["bytelevel", "metaspace"])
def test_identical_tokenizers_map_to_the_identity(pair, cache, side):
    tok = pair[side]
    vmap = build_vocabulary_map(tok, tok, cache_dir=cache)
    np.testing.assert_array_equal(vmap.teacher_to_student, np.arange(len(tok)))
    assert vmap.exact.all() and vmap.report()["exact_share"] == 1.0 and vmap.overlap == len(tok)
    probs = torch.softmax(torch.randn(3, len(tok), dtype=torch.float64), -1)
    torch.testing.assert_close(vmap.bin_probs(probs), probs)
    torch.testing.assert_close(vmap.exact_mass(probs), torch.ones(3, dtype=torch.float64))


def test_space_pieces_map_exactly_and_bytes_beat_raw_strings(pair, cache):
    teacher, student = pair
    vmap = build_vocabulary_map(teacher, student, cache_dir=cache)
    t_vocab, s_vocab = teacher.get_vocab(), student.get_vocab()
    for word in SHARED_WORDS:
        t, s = t_vocab[f"Ġ{word}"], s_vocab[f"▁{word}"]  # KeyError: not a whole token on one side
        assert vmap.teacher_to_student[t] == s and vmap.exact[t], word
    raw = len(set(t_vocab) & set(s_vocab))
    by_bytes = vmap.overlap
    print(f"\nexact overlap: {by_bytes} by bytes, {raw} by raw strings; {vmap.report()}")
    assert by_bytes > 1.5 * raw


def test_ties_go_to_the_piece_the_student_emits(pair, cache):
    """A space and a letter: the student's ▁ and its letter, not the byte-fallback <0x20> and <0x61>."""
    teacher, student = pair
    vmap = build_vocabulary_map(teacher, student, cache_dir=cache)
    t_vocab, s_vocab = teacher.get_vocab(), student.get_vocab()
    assert vmap.teacher_to_student[t_vocab["Ġ"]] == s_vocab["▁"]
    assert vmap.teacher_to_student[t_vocab["a"]] == s_vocab["a"]
    assert s_vocab["<0x20>"] < s_vocab["▁"] and s_vocab["<0x61>"] < s_vocab["a"]  # the lowest id would be wrong


def _teacher_bytes(teacher) -> dict[int, bytes]:
    """The ByteLevel teacher's bytes, read here from GPT-2's table (not through token_bytes)."""
    decoder = {c: b for b, c in bytes_to_unicode().items()}
    specials = set(teacher.all_special_ids)
    return {i: bytes(decoder[c] for c in p) for p, i in teacher.get_vocab().items() if i not in specials}


def _expected(student, raw: bytes) -> tuple[int, str]:
    """The target the module docstring's rules 3 and 4 give, from the student's vocabulary strings and its own
    tokenization, and which rule gave it."""
    pieces = {}
    for piece, i in student.get_vocab().items():
        if i not in student.all_special_ids:
            fallback = re.fullmatch(r"<0x([0-9A-F]{2})>", piece)
            pieces[i] = (
                bytes([int(fallback[1], 16)]) if fallback else piece.replace("▁", " ").encode(),
                bool(fallback),
            )
    try:
        raw.decode("utf-8")
        end = len(raw)
    except UnicodeDecodeError as err:
        end = err.start
    if end == 0:
        return student.convert_tokens_to_ids(f"<0x{raw[0]:02X}>"), "byte"
    ids = student(raw[:end].decode(), add_special_tokens=False)["input_ids"]
    how = "first piece"
    if pieces[ids[0]][0] == b" " and not raw.startswith(b" "):
        ids, how = ids[1:], "after the dummy prefix"
    if ids and ids[0] in pieces and raw.startswith(pieces[ids[0]][0]):
        return ids[0], how
    prefixes = [(len(b), not fallback, -i) for i, (b, fallback) in pieces.items() if raw.startswith(b)]
    return -max(prefixes)[2], "longest prefix"


def test_absent_tokens_map_to_the_first_piece_of_the_students_tokenization(pair, cache):
    teacher, student = pair
    vmap = build_vocabulary_map(teacher, student, cache_dir=cache)
    t_vocab = teacher.get_vocab()
    for word in TEACHER_WORDS:
        assert not vmap.exact[t_vocab[f"Ġ{word}"]] and f"▁{word}" not in student.get_vocab()
    rules = collections.Counter()
    for i, raw in _teacher_bytes(teacher).items():
        if not vmap.exact[i]:
            expected, how = _expected(student, raw)
            assert vmap.teacher_to_student[i] == expected, (raw, how)
            rules[how] += 1
    print(f"\nbinned teacher tokens by rule: {dict(rules)}")
    assert rules["first piece"] >= len(TEACHER_WORDS) and rules["byte"] >= 1, rules
    assert rules["after the dummy prefix"] >= 1 and rules["longest prefix"] >= 1, rules


def test_binned_targets_stand_for_a_prefix_of_the_teachers_bytes(pair, cache):
    teacher, student = pair
    vmap = build_vocabulary_map(teacher, student, cache_dir=cache)
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    binned = [i for i in range(len(teacher)) if t_bytes[i] and not vmap.exact[i]]
    assert len(binned) > 20
    for i in binned:
        target = s_bytes[vmap.teacher_to_student[i]]
        assert target and t_bytes[i].startswith(target) and target != t_bytes[i], (t_bytes[i], target)
    for i in np.flatnonzero(vmap.exact):
        assert not t_bytes[i] or s_bytes[vmap.teacher_to_student[i]] == t_bytes[i]


def test_whole_numbers_map_to_the_first_digit(pair, cache):
    teacher, student = pair
    vmap = build_vocabulary_map(teacher, student, cache_dir=cache)
    t_vocab, s_vocab = teacher.get_vocab(), student.get_vocab()
    assert "2024" not in s_vocab and "▁2024" not in s_vocab  # the student splits digits
    assert student("2024", add_special_tokens=False)["input_ids"] == [s_vocab[p] for p in ("▁", "2", "0", "2", "4")]
    assert vmap.teacher_to_student[t_vocab["2024"]] == s_vocab["2"] and not vmap.exact[t_vocab["2024"]]
    assert vmap.teacher_to_student[t_vocab["Ġ2024"]] == _first_piece(student, " 2024") == s_vocab["▁"]


def test_part_of_a_character_maps_to_the_byte_fallback_of_its_first_byte(pair, cache):
    """Only when no whole character comes first (else the whole characters' first piece: the test above)."""
    teacher, student = pair
    vmap = build_vocabulary_map(teacher, student, cache_dir=cache)
    multi = 0
    for i, raw in _teacher_bytes(teacher).items():
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if err.start == 0:  # no whole character first
                assert vmap.teacher_to_student[i] == student.convert_tokens_to_ids(f"<0x{raw[0]:02X}>"), raw
                multi += len(raw) > 1
    assert multi >= 1  # a merge inside a CJK character or an emoji, not only single bytes
    whole = "".join(map(bytes_to_unicode().get, "中".encode()))  # a whole character on both sides
    assert vmap.teacher_to_student[teacher.get_vocab()[whole]] == student.convert_tokens_to_ids("中")


def test_specials_map_by_role(pair, cache):
    teacher, student = pair
    vmap = build_vocabulary_map(teacher, student, cache_dir=cache)
    assert teacher.pad_token_id == teacher.eos_token_id
    m = vmap.teacher_to_student
    assert m[teacher.bos_token_id] == student.bos_token_id and vmap.exact[teacher.bos_token_id]
    assert m[teacher.eos_token_id] == student.eos_token_id and vmap.exact[teacher.eos_token_id]
    im_end = teacher.convert_tokens_to_ids("<|im_end|>")  # no counterpart: the student's EOS, not exact
    assert m[im_end] == student.eos_token_id and not vmap.exact[im_end]
    back = build_vocabulary_map(student, teacher, cache_dir=cache)
    m = back.teacher_to_student
    assert m[student.pad_token_id] == teacher.pad_token_id == teacher.eos_token_id
    assert m[student.bos_token_id] == teacher.bos_token_id and m[student.eos_token_id] == teacher.eos_token_id
    assert m[student.unk_token_id] == teacher.eos_token_id and not back.exact[student.unk_token_id]


def test_padded_teacher_head_drops_the_extra_ids(pair, cache):
    teacher, student = pair
    vmap = build_vocabulary_map(teacher, student, teacher_vocab_size=len(teacher) + 5, cache_dir=cache)
    assert vmap.teacher_vocab_size == len(teacher) + 5 == 503
    assert (vmap.teacher_to_student[-5:] == DROP).all() and not vmap.exact[-5:].any()
    assert (vmap.teacher_to_student[: len(teacher)] >= 0).all() and vmap.report()["padded"] == 5
    probs = torch.softmax(torch.randn(4, len(teacher) + 5, dtype=torch.float64), -1)
    torch.testing.assert_close(vmap.bin_probs(probs).sum(-1), 1 - probs[:, -5:].sum(-1))
    with pytest.raises(ValueError, match="last dimension has 498 entries, the vocabulary map 503"):
        vmap.bin_probs(probs[:, :-5])
    with pytest.raises(ValueError, match="below the teacher tokenizer"):
        build_vocabulary_map(teacher, student, teacher_vocab_size=len(teacher) - 1, cache_dir=cache)


def test_bin_probs_conserves_mass_and_equals_a_hand_loop(pair, cache):
    teacher, student = pair
    vmap = build_vocabulary_map(teacher, student, teacher_vocab_size=len(teacher) + 3, cache_dir=cache)
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(2, 3, vmap.teacher_vocab_size, generator=gen, dtype=torch.float64), -1)
    out = vmap.bin_probs(probs, vocab_size=len(student) + 7)
    assert out.shape == (2, 3, len(student) + 7) and out.dtype == torch.float64
    reference = np.zeros((2, 3, len(student) + 7))
    for i, j in enumerate(vmap.teacher_to_student.tolist()):
        if j >= 0:
            reference[..., j] += probs[..., i].numpy()
    np.testing.assert_allclose(out.numpy(), reference, rtol=1e-12, atol=1e-15)
    mapped = torch.from_numpy(vmap.teacher_to_student >= 0)
    torch.testing.assert_close(out.sum(-1), probs[..., mapped].sum(-1))
    exact = sum(probs[..., i] for i in np.flatnonzero(vmap.exact))
    torch.testing.assert_close(vmap.exact_mass(probs), exact)
    np.testing.assert_allclose(vmap.exact_mass(probs.numpy()), exact.numpy())
    assert vmap.bin_probs(probs.to(torch.bfloat16)).dtype == torch.float32


def test_binned_topk_is_the_topk_of_bin_probs(pair, cache):
    teacher, student = pair
    vmap = build_vocabulary_map(teacher, student, cache_dir=cache)
    logprobs = torch.log_softmax(4 * torch.randn(5, len(teacher), generator=torch.Generator().manual_seed(1)), -1)
    ids, lp = vmap.binned_topk(logprobs, 16)
    values, expected = vmap.bin_probs(logprobs.double().exp()).topk(16, -1)
    assert ids.dtype == torch.int64 and ids.shape == lp.shape == (5, 16)
    assert torch.equal(ids, expected)
    torch.testing.assert_close(lp.double(), values.log(), rtol=1e-5, atol=1e-6)
    # two teacher tokens with mass, on two different student tokens: the other slots are empty
    a, b = teacher.get_vocab()["Ġteacher"], teacher.get_vocab()["2024"]
    sparse = torch.full((len(teacher),), -torch.inf)
    sparse[a], sparse[b] = np.log(0.75), np.log(0.25)
    ids, lp = vmap.binned_topk(sparse, 4)
    assert ids.tolist() == [int(vmap.teacher_to_student[a]), int(vmap.teacher_to_student[b]), DROP, DROP]
    torch.testing.assert_close(lp[:2], torch.tensor([0.75, 0.25]).log())
    assert torch.isneginf(lp[2:]).all()


def test_the_disk_cache(pair, cache, monkeypatch):
    teacher, student = pair
    calls = []
    original = type(student).__call__
    monkeypatch.setattr(type(student), "__call__", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    first = build_vocabulary_map(teacher, student, cache_dir=cache)
    assert calls, "the first build never asked the student's tokenizer"
    directory = cache / "vocab-maps" / f"{tokenizer_hash(teacher)[:16]}-{tokenizer_hash(student)[:16]}"
    assert sorted(p.name for p in directory.iterdir()) == ["vocab_map.json", "vocab_map.npz"]

    def refuse(*args, **kwargs):
        raise AssertionError("the cached map called the student's tokenizer")

    monkeypatch.setattr(type(student), "__call__", refuse)
    second = build_vocabulary_map(teacher, student, teacher_vocab_size=len(teacher) + 2, cache_dir=cache)
    np.testing.assert_array_equal(second.teacher_to_student[: len(teacher)], first.teacher_to_student)
    np.testing.assert_array_equal(second.exact[: len(teacher)], first.exact)
    assert (second.teacher_to_student[-2:] == DROP).all()
    monkeypatch.undo()
    # another pair's files under this pair's name
    other = build_vocabulary_map(student, teacher, cache_dir=cache)
    copied = cache / "vocab-maps" / f"{other.teacher_hash[:16]}-{other.student_hash[:16]}"
    shutil.rmtree(directory)
    shutil.copytree(copied, directory)
    with pytest.raises(
        ValueError,
        match=r"holds a vocabulary map cache from other tokenizers \(teacher .*, student .*\), not from the teacher",
    ) as err:
        build_vocabulary_map(teacher, student, cache_dir=cache)
    for digest in (tokenizer_hash(teacher), tokenizer_hash(student)):
        assert str(err.value).count(digest) == 2  # stored (the other pair's) and given
