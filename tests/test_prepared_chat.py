"""prepare_chat and ChatDataModule(prepared=...): the prepared rows are the raw module's, batch for batch (padded
and packed), reading them tokenizes nothing, and each bad directory or option is one clear error.

The reference is a ChatDataModule on the raw file with the same settings and a map cache of its own, so nothing it
gives comes from the prepared directory; prepared.json's fields are checked against values computed here.
"""

import hashlib
import json
import shutil
from pathlib import Path

import datasets
import pytest
import torch
import transformers
from helpers import CHAT_MARKED as MARKED
from helpers import CHAT_PLAIN as PLAIN
from helpers import CHAT_SPECIAL, permuted_tokenizer, save_chat_tokenizers, write_jsonl
from helpers import chat_conversation as conversation

from lit_distill.data import ChatDataModule
from lit_distill.data.prepared_chat import prepare_chat
from lit_distill.data.teacher_cache.manifest import tokenizer_hash


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """test_chat_data.py's tokenizers: one byte-level BPE adding BOS, with the PLAIN template, MARKED, and none."""
    templates = {"plain": PLAIN, "marked": MARKED, "bare": None}
    return save_chat_tokenizers(tmp_path_factory.mktemp("tokenizers"), CHAT_SPECIAL, templates)


pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

LIMIT = 40  # rows of 1 turn have 20 tokens, 2 turns 35, 3 turns 50 (cut); the long system turn leaves nothing (dropped)
SETTINGS = {"max_seq_length": LIMIT, "val_fraction": 0.3, "batch_size": 3}
ARROW = "train/data-00000-of-00001.arrow"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    chats = [conversation(i, turns=1 + i % 3) for i in range(12)]
    chats.insert(5, conversation(99, turns=1, system="be nice " * 20))
    return write_jsonl(tmp_path_factory.mktemp("raw") / "chats.jsonl", [{"messages": m} for m in chats])


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tokenizers, source):
    root = tmp_path_factory.mktemp("prepared")
    data = ChatDataModule(source, tokenizer=tokenizers["plain"], cache_dir=str(root / "cache"), **SETTINGS)
    prepare_chat(data, root / "chats")
    return str(root / "chats")


def raw(tmp_path, source, tokenizer, **kwargs):
    data = ChatDataModule(source, tokenizer=tokenizer, cache_dir=str(tmp_path / "cache"), **{**SETTINGS, **kwargs})
    data.setup()
    return data


def opened(directory, **kwargs):
    data = ChatDataModule(prepared=directory, **{**SETTINGS, **kwargs})
    data.setup()
    return data


def assert_same_batches(ours, theirs):
    assert ours.keys() == theirs.keys() and {"input_ids", "labels", "attention_mask"} <= theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def collated(data, rows, n=None):
    return data.collate([rows[i] for i in range(len(rows) if n is None else min(n, len(rows)))])


# ------------------------------------------------------------------------------------------- the same rows
def test_prepared_batches_equal_those_of_the_raw_module(tmp_path, tokenizers, source, prepared):
    reference = raw(tmp_path, source, tokenizers["plain"])
    assert reference.summary["train"]["truncated"] and reference.summary["train"]["dropped"] == 1, "cut and drop"
    data = opened(prepared)
    for split in ("train_set", "val_set"):
        ours, theirs = getattr(data, split), getattr(reference, split)
        assert len(ours) == len(theirs) > 1, split
        assert_same_batches(collated(data, ours, 6), collated(reference, theirs, 6))
    for ours, theirs in zip(data.val_dataloader(), reference.val_dataloader(), strict=True):
        assert_same_batches(ours, theirs)
    assert data.summary == reference.summary
    files = {f["filename"] for split in (data.train_set, data.val_set) for f in split.cache_files}
    assert files and all(Path(f).parent.parent == Path(prepared) for f in files), "read from the prepared directory"
    tok = transformers.AutoTokenizer.from_pretrained(tokenizers["plain"])
    assert data.tokenizer.get_vocab() == tok.get_vocab() and data.tokenizer.chat_template == PLAIN


def test_prepared_json_says_what_was_prepared(tokenizers, source, prepared):
    meta = json.loads((Path(prepared) / "prepared.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(tokenizers["plain"])
    vocabulary = json.dumps(sorted(tok.get_vocab().items())).encode()
    arrows = sorted(Path(prepared).glob("*/*.arrow"))
    assert {p.parent.name for p in arrows} == {"train", "val"}
    assert meta == {
        "kind": "chat",
        "format_version": 1,
        "tokenizer_hash": hashlib.sha256(vocabulary).hexdigest(),
        "chat_template_sha256": hashlib.sha256(PLAIN.encode()).hexdigest(),
        "max_seq_length": LIMIT,
        "loss_on": "assistant",
        "truncation": "keep_start",
        "special_token_ids": {name: getattr(tok, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")},
        "summary": meta["summary"],  # compared with the raw module's in the test above
        "sources": [{"role": "train", "path": str(Path(source).resolve()), "bytes": Path(source).stat().st_size}],
        "sha256": {f"{p.parent.name}/{p.name}": hashlib.sha256(p.read_bytes()).hexdigest() for p in arrows},
    }
    assert meta["summary"]["train"]["rows"] + meta["summary"]["val"]["rows"] == 12


def test_reading_a_prepared_directory_tokenizes_nothing(tmp_path, tokenizers, source, prepared, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("tokenized")

    monkeypatch.setattr(datasets.Dataset, "map", refuse)
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "__call__", refuse)
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "apply_chat_template", refuse)
    with pytest.raises(RuntimeError, match="tokenized"):  # the patches bite where rows are made
        raw(tmp_path, source, tokenizers["plain"])
    data = ChatDataModule(prepared=prepared, **SETTINGS)
    data.prepare_data()
    data.setup()
    batch, val = next(iter(data.train_dataloader())), next(iter(data.val_dataloader()))
    assert batch["input_ids"].shape[0] == val["input_ids"].shape[0] == 3


def test_packing_a_prepared_directory_equals_packing_the_raw_data(tmp_path, tokenizers, source, prepared):
    reference = raw(tmp_path, source, tokenizers["plain"], packing=True)
    data = opened(prepared, packing=True)
    packed = len(reference.train_set)
    assert 1 < packed < reference.summary["train"]["rows"], "the rows must pack"
    assert len(data.train_set) == packed and data.summary == reference.summary
    assert_same_batches(collated(data, data.train_set), collated(reference, reference.train_set))
    assert "position_ids" in collated(data, data.train_set, 2)
    assert_same_batches(collated(data, data.val_set), collated(reference, reference.val_set))


def test_a_template_file_travels_with_the_prepared_tokenizer(tmp_path, tokenizers, source):
    """Prepared with chat_template= a file and no validation, read with neither: the same rows and stop ids."""
    (tmp_path / "t.jinja").write_text(MARKED)
    reference = raw(tmp_path, source, tokenizers["bare"], chat_template=str(tmp_path / "t.jinja"), val_fraction=0.0)
    prepare_chat(reference, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["prepared.json", "tokenizer", "train"]
    data = opened(str(tmp_path / "out"), val_fraction=0.0)
    assert data.tokenizer.chat_template == MARKED and data.val_set is None and data.val_dataloader() == []
    assert data.stop_token_ids == reference.stop_token_ids
    assert_same_batches(collated(data, data.train_set), collated(reference, reference.train_set))


# --------------------------------------------------------------------------------------------- bad input
def test_a_directory_that_is_not_a_prepared_chat_directory(tmp_path, prepared):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty is not a prepared chat directory: it has no prepared\.json\."
                       r" Make one with lit_distill\.data\.prepared_chat\.prepare_chat\("):  # fmt: skip
        ChatDataModule(prepared=str(tmp_path / "empty"))
    meta = json.loads((Path(prepared) / "prepared.json").read_text())
    for kind, version, found in (("text", 1, "kind='text', format_version=1"), ("chat", 2, "format_version=2")):
        copy = shutil.copytree(prepared, tmp_path / f"{kind}{version}")
        (copy / "prepared.json").write_text(json.dumps({**meta, "kind": kind, "format_version": version}))
        with pytest.raises(ValueError, match=rf"{found}; ChatDataModule reads kind='chat', format_version=1"):
            ChatDataModule(prepared=str(copy), **SETTINGS)


def test_train_and_prepared_are_one_or_the_other(source, prepared):
    for options in ({}, {"train": source, "prepared": prepared}, {"val": source, "prepared": prepared}):
        with pytest.raises(ValueError, match=r"ChatDataModule reads train= \(and val=\) or prepared="):
            ChatDataModule(**options)


def test_another_tokenizer_names_both_hashes(tmp_path, tokenizers, prepared):
    other = permuted_tokenizer(Path(tokenizers["plain"]), tmp_path / "other")
    ours = tokenizer_hash(transformers.AutoTokenizer.from_pretrained(other))
    theirs = json.loads((Path(prepared) / "prepared.json").read_text())["tokenizer_hash"]
    assert ours != theirs
    with pytest.raises(ValueError, match=rf"another tokenizer \(its tokenizer_hash {theirs[:12]}, this module's"
                       rf" {ours[:12]}\)"):  # fmt: skip
        ChatDataModule(prepared=prepared, tokenizer=str(other), **SETTINGS)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_seq_length": 2048}, rf"with max_seq_length={LIMIT}, this module has max_seq_length=2048"),
        ({"loss_on": "all"}, r"with loss_on='assistant', this module has loss_on='all'"),
        ({"truncation": "drop"}, r"with truncation='keep_start', this module has truncation='drop'"),
        ({"tokenizer": "marked"}, r"another chat template \(its sha256 [0-9a-f]{12}, this module's [0-9a-f]{12}\)"),
        ({"chat_template": "bundled"}, r"another chat template"),
    ],
)
def test_other_settings_name_both_values(tokenizers, prepared, options, message):
    if "tokenizer" in options:  # the same vocabulary, another template
        options = {"tokenizer": tokenizers[options["tokenizer"]]}
    with pytest.raises(ValueError, match=message):
        ChatDataModule(prepared=prepared, **{**SETTINGS, **options})


def test_a_corrupt_or_missing_arrow_file(tmp_path, prepared):
    corrupt = shutil.copytree(prepared, tmp_path / "corrupt")
    data = bytearray((corrupt / ARROW).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (corrupt / ARROW).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"corrupt is truncated or corrupt: {ARROW} differs from its sha256 in"
                       r" prepared\.json; prepare it again"):  # fmt: skip
        opened(str(corrupt))
    missing = shutil.copytree(prepared, tmp_path / "missing")
    (val,) = (missing / "val").glob("*.arrow")
    val.unlink()
    with pytest.raises(ValueError, match=rf"truncated or corrupt: val/{val.name} is missing; prepare it again"):
        opened(str(missing))


def test_prepare_refuses_an_existing_directory(tmp_path, tokenizers, source):
    (tmp_path / "out").mkdir()
    data = ChatDataModule(source, tokenizer=tokenizers["plain"], cache_dir=str(tmp_path / "cache"), **SETTINGS)
    with pytest.raises(FileExistsError, match=r"out exists: prepare into a new directory, or delete it first"):
        prepare_chat(data, tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_an_interrupted_prepare_leaves_nothing(tmp_path, tokenizers, source, monkeypatch):
    real, saved = datasets.Dataset.save_to_disk, []

    def disk_full(self, path, *args, **kwargs):
        saved.append(Path(path).name)
        if Path(path).name == "val":
            raise OSError(28, "No space left on device")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", disk_full)
    data = ChatDataModule(source, tokenizer=tokenizers["plain"], cache_dir=str(tmp_path / "cache"), **SETTINGS)
    with pytest.raises(OSError, match="No space left on device"):
        prepare_chat(data, tmp_path / "out")
    assert saved == ["train", "val"], "the train split was written before the failure"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
