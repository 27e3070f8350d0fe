"""The demo's students with their own tokenizer: the student's tokenizer, the bits/byte column, the two rows."""

import json
import math
import re

import pytest
import torch

from lit_distill.demo.measure import held_out
from lit_distill.demo.report import Row, cross_verdict, report
from lit_distill.demo.student_tokenizer import BYTE_PIECES, STUDENT_VOCAB, train_metaspace_bpe

TEXT = "Hello world, thou art\n  mad \u2014 caf\u00e9 \u65e5\u672c \U0001f642 1234567"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    from lit_distill.data.corpus import read_documents, split_documents

    train, _ = split_documents(read_documents(), 0.05)  # the split the demo's BPE is trained on
    return train_metaspace_bpe(train, STUDENT_VOCAB, tmp_path_factory.mktemp("cache"))


def test_the_student_tokenizer_is_metaspace_with_byte_fallback_and_2048_tokens(student_dir):
    from lit_distill.data.cross_tokenizer import token_bytes
    from lit_distill.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(str(student_dir))
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    assert len(tokenizer) == STUDENT_VOCAB == 2048
    steps = [step["type"] for step in spec["pre_tokenizer"]["pretokenizers"]]
    assert steps == ["Split", "Punctuation", "Metaspace"] and spec["model"]["byte_fallback"] is True
    assert "ByteLevel" not in json.dumps(spec)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)
    table = token_bytes(tokenizer)  # accepted: its bytes can be read
    vocab = tokenizer.get_vocab()
    assert all(table[vocab[piece]] == bytes([b]) for b, piece in enumerate(BYTE_PIECES))  # pieces, not specials
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert "<0xF0>" in pieces and "<0xE6>" in pieces  # emoji and CJK are not in Shakespeare: byte fallback
    assert pieces[0].startswith("\u2581") and tokenizer.unk_token_id not in ids
    assert b"".join(table[i] for i in ids) == b" " + TEXT.encode()  # the dummy prefix, then the text exactly
    assert tokenizer.decode(ids) == TEXT
    # newlines and punctuation are pieces of their own: a word's pieces do not depend on its neighbours
    words = tokenizer.convert_ids_to_tokens(tokenizer("gone,\nMust go", add_special_tokens=False)["input_ids"])
    assert "," in words and "\n" in words and not any("\n" in w and w != "\n" for w in words)
    mtime = (student_dir / "tokenizer.json").stat().st_mtime_ns
    from lit_distill.data.corpus import read_documents, split_documents

    assert train_metaspace_bpe(split_documents(read_documents(), 0.05)[0], 2048, student_dir.parents[1]) == student_dir
    assert (student_dir / "tokenizer.json").stat().st_mtime_ns == mtime  # the same documents: reused, not retrained


class _Data:
    """The part of TextDataModule that :func:`held_out` reads."""

    def __init__(self, blocks, tokenizer, batch_size=3) -> None:
        self.val_blocks, self.tokenizer, self.batch_size = blocks, tokenizer, batch_size

    def setup(self) -> None:
        pass


def _piece_bytes(piece: str) -> bytes:
    """A piece's bytes written out by hand (``<0xNN>`` one byte, ``▁`` a space), independent of ``token_bytes``."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes.fromhex(piece[3:5])
    return piece.replace("\u2581", " ").encode()


def test_bits_per_byte_matches_a_float64_computation_by_hand(student_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_distill.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(str(student_dir))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=2048, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=1)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    ids = tokenizer([TEXT, "To be, or not to be"], add_special_tokens=False)["input_ids"]
    stream = [token for row in ids for token in (*row, tokenizer.eos_token_id)]  # as pack() packs
    blocks = torch.tensor(stream[: len(stream) // 8 * 8]).view(-1, 8)  # a last batch of another size
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        logprobs = model(input_ids=blocks).logits.double().log_softmax(-1)[:, :-1]
    for row, lp in zip(blocks, logprobs, strict=True):
        for position, target in enumerate(row[1:].tolist()):
            nats -= float(lp[position, target])
            special = target in tokenizer.all_special_ids
            nbytes += 0 if special else len(_piece_bytes(tokenizer.convert_ids_to_tokens(target)))
    measured = held_out(model, _Data(blocks, tokenizer))
    assert measured.bits_per_byte == pytest.approx(nats / math.log(2) / nbytes, rel=1e-5)
    assert measured.ce == pytest.approx(nats / (blocks.shape[0] * 7), rel=1e-5)
    assert math.isnan(held_out(model, _Data(blocks, None)).bits_per_byte)  # no tokenizer: not measured


def _row(name, bits, loss=5.0):
    return Row(name, loss, math.exp(loss), math.nan, 1000.0, 1.0, bits_per_byte=bits)


def test_the_verdict_gives_the_share_of_soft_labels_gain_recovered_and_the_column_blanks_what_is_unmeasured(
    tmp_path, capsys
):
    rows = [
        Row("teacher", 4.6, math.exp(4.6), math.nan, math.nan, 1.0, 3.5, 0.0, 2.0),
        _row("student: alone", 2.30),
        _row("student: soft-label", 2.20),
        _row("student: own-tokenizer alone", 2.40, loss=4.0),
        _row("student: cross-tokenizer", 2.34, loss=3.9),
    ]
    assert "recovers 60% of it" in cross_verdict(rows)
    report(rows, {"own-tokenizer alone": [(10, 4.5), (30, 4.0)]}, {}, tmp_path)
    out = capsys.readouterr().out
    assert "bits/byte" in out and "cross-tokenizer: 2.3400 bits/byte against 2.4000" in out
    own = next(line for line in out.splitlines() if line.startswith("student: own-tokenizer alone"))
    assert "nan" not in own and own.split()[5] == "2.4000"  # bits/byte after val loss and ppl; blanks after
    assert "compare them in bits/byte" in out
    saved = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["bits_per_byte"] for r in saved] == [2.0, 2.3, 2.2, 2.4, 2.34]


@pytest.mark.slow
def test_the_rows_of_another_tokenizer_train_end_to_end_with_a_finite_bits_per_byte(tmp_path, capsys):
    from lit_distill.cli import cli_main

    sizes = ["--teacher-steps", "4", "--student-steps", "4", "--val-every", "2"]
    out = tmp_path / "demo"
    cli_main(["demo", "--quick", *sizes, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
              "--techniques", "alone,own-tokenizer-alone,cross-tokenizer"])  # fmt: skip
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    assert list(rows) == ["teacher", "student: alone", "student: own-tokenizer alone", "student: cross-tokenizer"]
    assert all(math.isfinite(r["bits_per_byte"]) and 0 < r["bits_per_byte"] < 16 for r in rows.values())
    # the students of another tokenizer: its 2048 tokens, trained the same steps; no token-level scores
    assert rows["student: cross-tokenizer"]["val_loss"] > 0
    assert math.isnan(rows["student: cross-tokenizer"]["agreement"])
    assert results["curves"]["cross-tokenizer"][-1] == [4, rows["student: cross-tokenizer"]["val_loss"]]
    assert "vocabulary map:" in printed and "the teacher's 1,024 tokens" in printed
    share = float(re.search(r"alignment: ([\d.]+)% of the student's held-out positions are boundaries", printed)[1])
    assert 30 < share < 100
    assert "cross-tokenizer: " in printed and "bits/byte against" in printed
