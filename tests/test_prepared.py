"""A text corpus prepared once into memory-mapped token files: the rows, the cache, the command, the refusals."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import small_text_data

from lit_distill.cli import cli_main
from lit_distill.data import TextDataModule
from lit_distill.data.prepared import META, PreparedText, prepare_text, token_file
from lit_distill.data.shuffle import EpochShuffle
from lit_distill.data.text import pack


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The eight short works of ``small_text_data`` (BPE of 300 tokens), prepared in their cache."""
    return small_text_data(tmp_path_factory.mktemp("corpus"), seq_len=16)


def same_module(small, **changes):
    options = {"files": small.files, "vocab_size": 300, "seq_len": 16, "val_fraction": 0.25, "batch_size": 4}
    return TextDataModule(**{**options, "cache_dir": str(small.cache_dir), **changes})


def test_prepared_rows_are_the_rows_packed_in_memory(small):
    """Reference: ``pack`` of the held-out split's documents, as every run packed them before preparing."""
    assert small.meta is not None and small.train_blocks.dtype == torch.uint16
    meta = json.loads((small.prepared_dir / META).read_text())
    assert meta["row_counts"] == {"train": len(small.train_blocks), "val": len(small.val_blocks)}
    assert meta["special_token_ids"]["eos_token_id"] == small.tokenizer.eos_token_id == meta["eos_token_id"]
    for blocks, documents in ((small.train_blocks, small.train_documents), (small.val_blocks, small.val_documents)):
        assert torch.equal(blocks.long(), pack(documents, small.tokenizer, 16, "split"))
    batch = next(iter(small.train_dataloader()))["input_ids"]
    assert batch.dtype == torch.long and batch.shape == (4, 16)
    rows = {tuple(r) for r in small.train_blocks.long().tolist()}
    assert all(tuple(r) in rows for r in batch.tolist())
    assert small.describe()["train_documents"] == len(small.train_documents) == 6


def test_second_run_reads_the_prepared_corpus_without_reading_or_tokenizing(small, monkeypatch):
    import lit_distill.data.text as text

    def refuse(*args, **kwargs):
        raise AssertionError("the second run must not read, tokenize or prepare the corpus")

    for name in ("read_documents", "prepare_text", "train_bpe", "pack"):
        monkeypatch.setattr(text, name, refuse)
    monkeypatch.setattr(type(small.tokenizer), "__call__", refuse)
    again = same_module(small)
    again.setup()
    assert again.prepared_dir == small.prepared_dir and again.fingerprint == small.fingerprint
    assert torch.equal(again.train_blocks, small.train_blocks)
    assert next(iter(again.val_dataloader()))["input_ids"].shape == (4, 16)


def test_an_edited_file_or_another_seq_len_is_prepared_anew(small, tmp_path):
    files = [str(tmp_path / "works.jsonl")]
    Path(files[0]).write_text(Path(small.files[0]).read_text())
    copy = same_module(small, files=files)
    assert copy.prepared_dir != small.prepared_dir  # the key names the file's path
    with open(files[0], "a") as f:
        f.write(json.dumps({"text": "Work 8. a new work at the end " * 9}) + "\n")
    edited = same_module(small, files=files)
    assert edited.prepared_dir != copy.prepared_dir
    edited.setup()
    assert torch.equal(edited.train_blocks.long(), pack(edited.train_documents, edited.tokenizer, 16, "train"))
    assert same_module(small, seq_len=8).prepared_dir != small.prepared_dir


def test_prepare_command_writes_what_the_module_reads(small, tmp_path, capsys):
    out = tmp_path / "prepared"
    args = ["--data.files", json.dumps(small.files), "--data.vocab_size", "300", "--data.seq_len", "16"]
    args += ["--data.val_fraction", "0.25", "--data.cache_dir", str(small.cache_dir), "--output", str(out)]
    assert cli_main(["prepare", *args]) == 0
    assert "Train on it with --data.prepared" in capsys.readouterr().out
    data = TextDataModule(prepared=str(out), seq_len=16, cache_dir=str(tmp_path / "other-cache"))
    data.setup()
    assert torch.equal(data.train_blocks, small.train_blocks) and torch.equal(data.val_blocks, small.val_blocks)
    assert data.tokenizer.get_vocab() == small.tokenizer.get_vocab()  # the one saved with the corpus
    assert cli_main(["prepare", *args]) == 2  # the directory exists: refused, not overwritten


def test_two_processes_tokenize_the_same_bytes_as_one(small, tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs two CPUs for num_proc=2")
    one = prepare_text(small.files, small.tokenizer, tmp_path / "one", seq_len=16, val_fraction=0.25)
    two = prepare_text(small.files, small.tokenizer, tmp_path / "two", seq_len=16, val_fraction=0.25, num_proc=2)
    assert one.sha256 == two.sha256 and one.sha256["train"] == small.meta.sha256["train"]


def test_epoch_shuffle_splits_one_order_over_processes_into_equal_batches():
    """Reference: ``torch.randperm`` of the seed, as one process draws it; 23 rows, batches of 3, 2 processes:
    3 batches each (18 rows), distinct, together the first 18 rows of the one-process order."""
    parts = []
    for rank in (0, 1):
        sampler = EpochShuffle(23, 3, lambda: 0, rank=rank, world_size=2)
        sampler.seed = 5
        parts.append(list(sampler))
        assert len(parts[-1]) == len(sampler) == 9
    order = torch.randperm(23, generator=torch.Generator().manual_seed(5)).tolist()
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == sorted(order[:18])
    resumed = EpochShuffle(23, 3, lambda: 2, rank=1, world_size=2)
    resumed.seed, resumed.resuming = 5, True
    assert list(resumed) == parts[1][6:]  # two batches done: the third is next


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
def test_two_processes_read_distinct_prepared_rows_in_equal_batches(small, tmp_path):
    """DDP on two CPU processes (tests/text_ddp_worker.py) over the prepared corpus: equal batch counts, no row
    on both, together the rows one process's order puts first (the rows of whole batches on both)."""
    lines = [json.dumps({"text": f"Line {i}: the quality of mercy is not strained."}) for i in range(150)]
    (tmp_path / "lines.jsonl").write_text("\n".join(lines) + "\n")
    data = same_module(small, files=[str(tmp_path / "lines.jsonl")], val_fraction=0.1)
    data.setup()
    rows = data.train_blocks.long()
    assert len({tuple(r) for r in rows.tolist()}) == len(rows)  # every row unique: rows stand for their index
    out = tmp_path / "seen.pt"
    worker = [sys.executable, "text_ddp_worker.py", str(data.prepared_dir), str(out)]
    proc = subprocess.run(worker, capture_output=True, text=True, timeout=600, cwd=str(Path(__file__).parent))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out, weights_only=False)
    n, per_step = len(rows), 2 * 2  # two processes, batches of two
    assert [len(batches) for batches in result["seen"]] == [n // per_step] * 2
    seen = [[tuple(r) for batch in batches for r in batch] for batches in result["seen"]]
    assert not set(seen[0]) & set(seen[1])
    order = torch.randperm(n, generator=torch.Generator().manual_seed(result["seed"]))[: n // per_step * per_step]
    assert sorted(seen[0] + seen[1]) == sorted(tuple(r) for r in rows[order].tolist())


def test_bad_prepared_directories_are_refused_with_what_to_do(small, tmp_path, monkeypatch):
    good = tmp_path / "good"
    prepare_text(small.files, small.tokenizer, good, seq_len=16, val_fraction=0.25)
    with pytest.raises(ValueError, match="holds rows of seq_len=16, this run reads seq_len=8"):
        TextDataModule(prepared=str(good), seq_len=8).setup()
    other = TextDataModule(files=small.files, vocab_size=320, seq_len=16, cache_dir=str(tmp_path / "c"))
    other.tokenizer.save_pretrained(str(tmp_path / "other-tokenizer"))
    with pytest.raises(ValueError, match="was tokenized by another tokenizer"):
        TextDataModule(prepared=str(good), tokenizer=str(tmp_path / "other-tokenizer"), seq_len=16).setup()
    with pytest.raises(ValueError, match="pass files or prepared, not both"):
        TextDataModule(files=small.files, prepared=str(good))
    with pytest.raises(FileNotFoundError, match=r"is not a prepared corpus: it has no prepared\.json"):
        TextDataModule(prepared=str(tmp_path), seq_len=16)
    for damage in ("flip", "cut"):
        broken = tmp_path / damage
        prepare_text(small.files, small.tokenizer, broken, seq_len=16, val_fraction=0.25)
        data = bytearray(token_file(broken, "train").read_bytes())
        if damage == "flip":
            data[10] ^= 1
        token_file(broken, "train").write_bytes(data if damage == "flip" else data[:-2])
        with pytest.raises(ValueError, match=r"train\.bin is truncated or corrupt"):
            TextDataModule(prepared=str(broken), seq_len=16).setup()
    meta = json.loads((good / META).read_text())
    (good / META).write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version is 99, this lit-distill reads 1"):
        PreparedText.read(good)
    (good / META).write_text(json.dumps({**meta, "kind": "chat"}))
    with pytest.raises(ValueError, match=r"holds prepared chat data, not text: read it with ChatDataModule"):
        PreparedText.read(good)


def test_preparing_refuses_bad_settings_and_leaves_nothing_half_written(small, tmp_path, monkeypatch):
    import lit_distill.data.prepared as prepared

    with pytest.raises(ValueError, match="fewer than one sequence of seq_len=100000"):
        prepare_text(small.files, small.tokenizer, tmp_path / "short", seq_len=100_000, val_fraction=0.25)
    with pytest.raises(ValueError, match=r"num_proc must lie in \[1, \d+\] \(this machine's CPUs\)"):
        prepare_text(small.files, small.tokenizer, tmp_path / "many", seq_len=16, num_proc=(os.cpu_count() or 1) + 1)
    with pytest.raises(ValueError, match=r"num_proc must lie in \[1, \d+\]"):  # at once, not when training starts
        same_module(small, num_proc=(os.cpu_count() or 1) + 1)
    with pytest.raises(FileExistsError, match="exists: prepare into a new directory"):
        prepare_text(small.files, small.tokenizer, tmp_path, seq_len=16)
    real = prepared._write_tokens

    def fill_disk(batches, path, bar, itemsize):
        if path.name == "val.bin":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(batches, path, bar, itemsize)

    monkeypatch.setattr(prepared, "_write_tokens", fill_disk)
    with pytest.raises(OSError, match="No space left on device"):
        prepare_text(small.files, small.tokenizer, tmp_path / "full", seq_len=16, val_fraction=0.25)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the directory nor its temporary twin


def test_teacher_cache_reads_the_prepared_rows_and_records_their_fingerprint(small, tmp_path, monkeypatch):
    from helpers import tiny, trainer

    from lit_distill.data.teacher_cache import TeacherSignal, cache_teacher

    def refuse(*args, **kwargs):
        raise AssertionError("the teacher cache must not tokenize the prepared corpus again")

    monkeypatch.setattr(type(small.tokenizer), "__call__", refuse)
    signal = TeacherSignal(tiny(hidden=32, seed=1, vocab_size=small.vocab_size), method="topk", k=4)
    manifest = cache_teacher(signal, small, tmp_path / "cache", max_sequences=6, trainer=trainer())
    assert manifest.settings.data_fingerprint == small.fingerprint == small.meta.fingerprint
    assert len(small.fingerprint) == 32 and manifest.settings.sequences == 6


def test_a_corpus_another_process_just_prepared_is_read_not_refused(small, tmp_path, monkeypatch):
    """Two processes preparing one corpus into one cache: the later one finds the directory whole and reads it."""
    import lit_distill.data.text as text

    data = same_module(small, cache_dir=str(tmp_path))
    real = text.prepare_text

    def others_first(files, tokenizer, directory, **options):
        real(files, tokenizer, directory, **options)  # the other process wins the race
        return real(files, tokenizer, directory, **options)  # this one then finds the directory there

    monkeypatch.setattr(text, "prepare_text", others_first)
    data.setup()
    assert torch.equal(data.train_blocks, small.train_blocks)
