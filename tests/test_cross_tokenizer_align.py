"""Cross-tokenizer data: each token's bytes, read from two tiny tokenizers trained here (a ByteLevel BPE and a
Metaspace BPE with byte fallback), and byte-aligned groups between two tokenizations of one text, checked against
the tokenizers' own decoding, hand-written groups and a plain two-pointer walk."""

import importlib
import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lit_distill.data.cross_tokenizer import (
    added_prefix,
    align,
    byte_lengths,
    byte_offsets,
    bytes_to_unicode,
    text_bytes_of,
    token_bytes,
)

#: the module, not the function the package exports under the same name
token_bytes_module = importlib.import_module("lit_distill.data.cross_tokenizer.token_bytes")

WORDS = "the quick brown fox jumps over lazy dog café naïve 12 345 2026 tokens bytes align, groups. Hello world!"
#: no CJK or emoji in training, so the Metaspace tokenizer reaches them only through <0xNN> pieces
CORPUS = [" ".join(random.Random(i).choices(WORDS.split(), k=12)) for i in range(300)]
TEXTS = ["Hello world", "1234567", "👍🏽", "東京は晴れ", "é", "  leading and trailing  ", "café 👍🏽 東京 12345."]
MIXED = [*WORDS.split(), "1234567", "👍🏽", "東京は晴れ", "é", "Ωμέγα", "\t", "x", "0", ":)"]


def bytelevel_tokenizer(vocab_size=420):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, show_progress=False)
    )
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def metaspace_tokenizer():
    """SentencePiece-style: ▁ for spaces, a dummy prefix on the first word, 256 <0xNN> byte-fallback pieces."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    )
    spec = json.loads(tok.to_str())
    learned = sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])
    names = [k for k, _ in learned[:3]] + [f"<0x{b:02X}>" for b in range(256)] + [k for k, _ in learned[3:]]
    spec["model"].update(vocab={k: i for i, k in enumerate(names)}, byte_fallback=True, unk_token="<unk>")
    for added in spec["added_tokens"]:
        added["id"] = names.index(added["content"])
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}],
    }
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="module")
def bytelevel():
    return bytelevel_tokenizer()


@pytest.fixture(scope="module")
def metaspace():
    return metaspace_tokenizer()


def ids_of(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids


def walk(s_ends, t_ends):
    """The reference: GOLD's two-pointer walk over end offsets, as (student, teacher) index pairs closing groups."""
    closes, i, j = [], 0, 0
    while i < len(s_ends) and j < len(t_ends):
        if s_ends[i] == t_ends[j]:
            closes.append((i, j))
            i, j = i + 1, j + 1
        elif s_ends[i] < t_ends[j]:
            i += 1
        else:
            j += 1
    return closes


# ---- token bytes


@pytest.mark.parametrize("text", TEXTS)
def test_bytelevel_bytes_reproduce_the_text(bytelevel, text):
    ids = ids_of(bytelevel, text)
    table = token_bytes(bytelevel)
    assert text_bytes_of(ids, table) == text.encode() == bytelevel.decode(ids).encode()
    assert added_prefix(ids, table, text) == 0


@pytest.mark.parametrize("text", TEXTS)
def test_metaspace_bytes_reproduce_the_text_after_the_dummy_prefix(metaspace, text):
    ids = ids_of(metaspace, text)
    table = token_bytes(metaspace)
    got = text_bytes_of(ids, table)
    # prepend_scheme="first" adds a space only where the text does not start with one
    prefix = b"" if text.startswith(" ") else b" "
    assert got == prefix + text.encode()
    assert added_prefix(ids, table, text) == len(prefix)
    assert got[added_prefix(ids, table, text) :] == text.encode()


def test_byte_fallback_pieces_are_one_byte(metaspace):
    table = token_bytes(metaspace)
    vocab = metaspace.get_vocab()
    assert all(table[vocab[f"<0x{b:02X}>"]] == bytes([b]) for b in range(256))
    pieces = metaspace.convert_ids_to_tokens(ids_of(metaspace, "東京 👍🏽"))
    fallback = [p for p in pieces if p.startswith("<0x")]
    assert len(fallback) == len("東京👍🏽".encode())  # every byte of the unseen characters
    assert b"".join(table[vocab[p]] for p in fallback) == "東京👍🏽".encode()


def test_bytes_to_unicode_is_the_bytelevel_alphabet():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert (table[ord(" ")], table[ord("\n")], table[ord("a")]) == ("Ġ", "Ċ", "a")


def test_special_tokens_are_zero_width_and_added_text_is_its_content():
    tokenizer = bytelevel_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<|begin|>", "additional_special_tokens": ["<|im_start|>"]})
    tokenizer.add_tokens(["<think>"])  # not special: stands for its text
    table, lengths = token_bytes(tokenizer), byte_lengths(tokenizer)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    for name in ("<|begin|>", "<|im_start|>", "<|endoftext|>"):
        assert table[tokenizer.convert_tokens_to_ids(name)] == b""
    assert table[tokenizer.convert_tokens_to_ids("<think>")] == b"<think>"
    assert all(table[i] == b"" for i in tokenizer.all_special_ids)
    assert len(table) == len(tokenizer) and lengths.tolist() == [len(b) for b in table]


def test_metaspace_specials_are_zero_width(metaspace):
    table = token_bytes(metaspace)
    assert [table[metaspace.convert_tokens_to_ids(t)] for t in ("<unk>", "<s>", "</s>")] == [b"", b"", b""]


def test_g_and_space_pieces_give_the_same_bytes(bytelevel, metaspace):
    b_vocab, m_vocab = bytelevel.get_vocab(), metaspace.get_vocab()
    word = next(w for w in ("the", "quick", "fox") if "Ġ" + w in b_vocab and "▁" + w in m_vocab)
    assert token_bytes(bytelevel)[b_vocab["Ġ" + word]] == token_bytes(metaspace)[m_vocab["▁" + word]]
    assert token_bytes(bytelevel)[b_vocab["Ġ" + word]] == b" " + word.encode()


def test_unrecoverable_tokenizers_raise_naming_them():
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "hel": 1, "##lo": 2}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    with pytest.raises(
        ValueError,
        match=r"tokenizer 'tiny-bert' is WordPiece: '##' continuation pieces drop the spaces between words,"
        r" so its token bytes cannot be recovered",
    ):
        token_bytes(PreTrainedTokenizerFast(tokenizer_object=wordpiece, name_or_path="tiny-bert"))
    no_fallback = Tokenizer(models.BPE({"<unk>": 0, "▁": 1, "a": 2}, [], unk_token="<unk>"))
    no_fallback.pre_tokenizer = pre_tokenizers.Metaspace()
    unnamed = PreTrainedTokenizerFast(tokenizer_object=no_fallback)
    with pytest.raises(ValueError, match=rf"{type(unnamed).__name__}.*without byte fallback"):
        token_bytes(unnamed)
    whitespace = Tokenizer(models.BPE({"<unk>": 0, "a": 1}, [], unk_token="<unk>"))
    whitespace.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="cannot be recovered"):
        token_bytes(PreTrainedTokenizerFast(tokenizer_object=whitespace))


def test_second_call_is_cached_until_the_vocabulary_grows(monkeypatch):
    tokenizer = bytelevel_tokenizer(300)
    builds = []
    real = token_bytes_module._build
    monkeypatch.setattr(token_bytes_module, "_build", lambda tok: builds.append(1) or real(tok))
    first = token_bytes(tokenizer)
    assert token_bytes(tokenizer) is first and byte_lengths(tokenizer) is byte_lengths(tokenizer)
    assert len(builds) == 1
    tokenizer.add_tokens(["<new>"])
    assert token_bytes(tokenizer)[-1] == b"<new>" and len(builds) == 2


# ---- alignment on hand-made tables

T = [b"", b"Hel", b"lo", b"Hello", b" wor", b"ld", b" world", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"123", b"456"]
BOS, HEL, LO, HELLO, WOR, LD, WORLD = range(7)
D = {c: 7 + i for i, c in enumerate("1234567")}


def groups(a):
    return a.student_last.tolist(), a.teacher_last.tolist(), a.student_group.tolist(), a.teacher_group.tolist()


def test_byte_offsets_are_cumulative_lengths(bytelevel):
    ids = ids_of(bytelevel, "café 👍🏽 東京")
    want = np.cumsum([len(token_bytes(bytelevel)[i]) for i in ids])
    assert byte_offsets(ids, token_bytes(bytelevel)).tolist() == want.tolist()
    assert byte_offsets(np.array(ids), byte_lengths(bytelevel)).tolist() == want.tolist()
    assert byte_offsets([HELLO, BOS, WORLD], T).tolist() == [5, 5, 11]


def test_one_token_spans_several_both_ways():
    a = align([HELLO, WOR, LD], [HEL, LO, WORLD], T, T)
    assert groups(a) == ([0, 2], [1, 2], [0, 1, 1], [0, 0, 1])
    assert a.student_count.tolist() == [1, 2] and a.teacher_count.tolist() == [2, 1]
    assert a.group_end.tolist() == [5, 11] and a.num_groups == 2


def test_digits_split_finely_on_one_side():
    a = align([D[c] for c in "1234567"], [T.index(b"123"), T.index(b"456"), D["7"]], T, T)
    assert groups(a) == ([2, 5, 6], [0, 1, 2], [0, 0, 0, 1, 1, 1, 2], [0, 1, 2])
    assert a.student_count.tolist() == [3, 3, 1]


def test_multibyte_characters_split_across_tokens():
    table = [b"\xf0\x9f", b"\x91\x8d", b"\xf0", b"\x9f\x91", b"\x8d", b"\xe6\x9d\xb1", b"\xe6", b"\x9d\xb1"]
    a = align([0, 1, 5], [2, 3, 4, 6, 7], table, table)  # 👍 then 東, cut differently
    assert groups(a) == ([1, 2], [2, 4], [0, 0, 1], [0, 0, 0, 1, 1])


def test_bos_on_one_side_joins_the_first_group():
    a = align([BOS, HELLO, WORLD], [HELLO, WOR, LD], T, T)
    assert groups(a) == ([1, 2], [0, 2], [0, 0, 1], [0, 1, 1])  # teacher's group 0 closes at its position 0
    assert a.student_count.tolist() == [2, 1]


def test_bos_on_both_sides_is_a_group_at_position_0():
    a = align([BOS, HEL, LO], [BOS, HELLO], T, T)
    assert groups(a) == ([0, 2], [0, 1], [0, 1, 1], [0, 1])
    assert a.group_end.tolist() == [0, 5]


def test_trailing_eos_and_pad():
    eos = BOS  # pad == eos: all zero-width
    a = align([HELLO, eos, eos], [HEL, LO], T, T)
    assert groups(a) == ([0], [1], [0, -1, -1], [0, 0])
    a = align([HELLO, eos], [HEL, LO, eos], T, T)
    assert groups(a) == ([0, 1], [1, 2], [0, 1], [0, 0, 1])


def test_identical_tokenizers_give_one_group_per_token(bytelevel):
    ids = ids_of(bytelevel, "café 👍🏽 東京は晴れ 1234567 the quick brown fox")
    table = token_bytes(bytelevel)
    a = align(ids, ids, table, table)
    assert a.student_last.tolist() == a.teacher_last.tolist() == list(range(len(ids)))
    assert (a.student_count == 1).all() and (a.teacher_count == 1).all()


def test_truncated_inside_a_character_drops_the_partial_group():
    table = [b"ab", b"\xf0\x9f\x91\x8d", b"a", b"b", b"\xf0\x9f"]
    a = align([0, 1], [2, 3, 4], table, table)  # the teacher was cut inside 👍
    assert groups(a) == ([0], [1], [0, -1], [0, 0, -1])


def test_truncation_at_a_character_boundary_needs_the_flag():
    with pytest.raises(ValueError, match="stops early"):
        align([HELLO, WORLD], [HEL, LO], T, T)
    a = align([HELLO, WORLD], [HEL, LO], T, T, truncated=True)
    assert groups(a) == ([0], [1], [0, -1], [0, 0])


def test_different_texts_raise_with_the_offset():
    table = [b"Hello", b" world", b"Hello w", b"urld"]
    with pytest.raises(ValueError, match=r"differ at byte 7.*b'Hello world'.*b'Hello wurld'"):
        align([0, 1], [2, 3], table, table)
    with pytest.raises(ValueError, match="outside the table"):
        align([0, -100], [2, 3], table, table)


# ---- alignment on real tokenizers: every group holds the same bytes on both sides


def random_text(rng):
    return "".join(rng.choice(MIXED) + rng.choice(["", " ", "  ", ", "]) for _ in range(rng.randint(1, 10)))


@pytest.mark.parametrize(
    "specials", [(0, 0, 0), (1, 0, 0), (1, 1, 1), (0, 2, 1)], ids=["plain", "student-bos", "both-bos-eos", "pad"]
)
def test_groups_hold_the_same_bytes_on_random_texts(bytelevel, metaspace, specials):
    """Metaspace student, ByteLevel teacher; ``specials``: student BOS, teacher leading EOS/pad, EOS on both."""
    s_bos, t_lead, eos = specials
    s_table, t_table = token_bytes(metaspace), token_bytes(bytelevel)
    rng, wide = random.Random(7), [0, 0]
    for _ in range(50):
        text = random_text(rng)
        s_ids = [metaspace.bos_token_id] * s_bos + ids_of(metaspace, text) + [metaspace.eos_token_id] * eos
        t_ids = [bytelevel.eos_token_id] * t_lead + ids_of(bytelevel, text) + [bytelevel.eos_token_id] * eos
        skip = added_prefix(s_ids, s_table, text)
        a = align(s_ids, t_ids, s_table, t_table, student_skip=skip)
        s_ends = np.maximum(np.cumsum([len(s_table[i]) for i in s_ids]) - skip, 0).tolist()
        t_ends = np.cumsum([len(t_table[i]) for i in t_ids]).tolist()
        assert list(zip(a.student_last.tolist(), a.teacher_last.tolist(), strict=True)) == walk(s_ends, t_ends), text
        s_bytes, t_bytes = text_bytes_of(s_ids, s_table)[skip:], text_bytes_of(t_ids, t_table)
        s_start = t_start = 0
        for g in range(a.num_groups):
            s_end, t_end = s_ends[a.student_last[g]], t_ends[a.teacher_last[g]]
            assert s_bytes[s_start:s_end] == t_bytes[t_start:t_end], (text, g)
            s_start, t_start = s_end, t_end
        assert s_start == len(text.encode()) and (a.student_group >= 0).all() and (a.teacher_group >= 0).all()
        assert np.bincount(a.student_group).tolist() == a.student_count.tolist()
        assert np.bincount(a.teacher_group).tolist() == a.teacher_count.tolist()
        wide = [wide[0] + (a.student_count > 1).sum(), wide[1] + (a.teacher_count > 1).sum()]
    assert min(wide) > 0, "no group spans several tokens on one of the sides: the texts test nothing"


def test_dummy_prefix_must_be_skipped(metaspace, bytelevel):
    s_ids, t_ids = ids_of(metaspace, "Hello world"), ids_of(bytelevel, "Hello world")
    with pytest.raises(ValueError, match="differ at byte 0"):
        align(s_ids, t_ids, token_bytes(metaspace), token_bytes(bytelevel))
    a = align(s_ids, t_ids, token_bytes(metaspace), token_bytes(bytelevel), student_skip=1)
    assert a.group_end[-1] == len("Hello world")
