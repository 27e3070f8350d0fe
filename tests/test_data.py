"""TextDataModule: the bundled corpus split by whole works, local files, tokenizers, packing, bad input."""

import gzip
import json
import os

import lightning.pytorch as pl
import pytest
import torch
from helpers import InterruptAt, adam, tiny
from lightning.pytorch.callbacks import Callback

from lit_distill.callbacks import CheckpointOnInterrupt
from lit_distill.data import EpochShuffle, TextDataModule
from lit_distill.data.cache_dir import writable_dir
from lit_distill.data.corpus import BUNDLED_CORPUS, read_documents, split_documents, split_works
from lit_distill.modules import LanguageModelTraining

TEXT = "\n".join(f"Line {i}: the quality of mercy is not strained, it droppeth as the gentle rain." for i in range(400))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_bundled_corpus_is_42_whole_works():
    documents = read_documents()
    assert len(documents) == 42
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        assert "".join(documents) == f.read()  # nothing lost, nothing duplicated
    titles = [d.lstrip().splitlines()[0] for d in documents]
    assert titles[0] == "ALL'S WELL THAT ENDS WELL" and "HAMLET, PRINCE OF DENMARK" in titles
    assert all(
        any(line.startswith("by William Shakespeare") for line in d.lstrip().splitlines()[:6]) for d in documents
    )


def test_validation_holds_out_whole_works_that_never_appear_in_training():
    train, val = split_documents(read_documents(), 0.05)
    assert len(val) == 2 and len(train) == 40
    train_text = "".join(train)
    for work in val:
        title = work.lstrip().splitlines()[0]
        assert title not in train_text
        assert work[len(work) // 2 : len(work) // 2 + 200] not in train_text


def test_single_document_is_cut_without_overlap():
    train, val = split_documents([TEXT], 0.1)
    assert train[0] + val[0] == TEXT and val[0].startswith("\n")
    assert 0.05 < len(val[0]) / len(TEXT) < 0.15


def test_local_files(tmp_path, cache):
    (tmp_path / "a.txt").write_text(TEXT)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        for i in range(3):
            f.write(json.dumps({"body": f"document {i} " + TEXT[:2000]}) + "\n")
    docs = read_documents([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl.gz")], text_field="body")
    assert len(docs) == 4 and docs[1].startswith("document 0")
    data = TextDataModule(
        files=[str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl.gz")],
        text_field="body",
        vocab_size=300,
        seq_len=16,
        batch_size=4,
        val_fraction=0.25,
        cache_dir=cache,
    )
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (4, 16) and batch["input_ids"].max() < data.vocab_size
    val_ids = data.val_blocks.reshape(-1)
    decoded = data.tokenizer.decode(val_ids[:40])
    assert decoded and decoded in "".join(data.val_documents)  # packed from the held-out documents


def test_packing_round_trips_the_text(cache, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    data = TextDataModule(
        files=[str(tmp_path / "a.txt")], vocab_size=300, seq_len=32, val_fraction=0.2, cache_dir=cache
    )
    data.setup()
    text = data.tokenizer.decode(data.train_blocks.reshape(-1))
    assert text.startswith("Line 0: the quality of mercy") and text in data.train_documents[0] + "<|endoftext|>"


def test_tokenizer_is_cached(tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    cache = tmp_path / "cache"
    TextDataModule(files=[str(tmp_path / "a.txt")], vocab_size=300, seq_len=16, cache_dir=str(cache))
    (saved,) = (cache / "tokenizers").iterdir()
    stamp = os.path.getmtime(saved / "tokenizer.json")
    again = TextDataModule(files=[str(tmp_path / "a.txt")], vocab_size=300, seq_len=16, cache_dir=str(cache))
    assert os.path.getmtime(saved / "tokenizer.json") == stamp and again.vocab_size == len(again.tokenizer)


def test_a_saved_tokenizer_by_path(tmp_path, cache):
    (tmp_path / "a.txt").write_text(TEXT)
    first = TextDataModule(files=[str(tmp_path / "a.txt")], vocab_size=300, seq_len=16, cache_dir=cache)
    first.tokenizer.save_pretrained(tmp_path / "tok")
    second = TextDataModule(
        files=[str(tmp_path / "a.txt")], tokenizer=str(tmp_path / "tok"), seq_len=16, cache_dir=cache
    )
    assert second.tokenizer("mercy")["input_ids"] == first.tokenizer("mercy")["input_ids"]


def test_bad_input(tmp_path, cache, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"corpus file .*missing.txt does not exist"):
        TextDataModule(files=[str(tmp_path / "missing.txt")], cache_dir=cache)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="holds no text"):
        TextDataModule(files=[str(tmp_path / "empty.txt")], cache_dir=cache)
    (tmp_path / "short.txt").write_text("To be, or not to be, that is the question:\n" * 30)
    short = TextDataModule(files=[str(tmp_path / "short.txt")], vocab_size=300, seq_len=4096, cache_dir=cache)
    with pytest.raises(ValueError, match="fewer than one sequence of seq_len=4096"):
        short.setup()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match=r"could not find the tokenizer 'no-such/tokenizer'.*train a byte-level BPE"):
        TextDataModule(files=[str(tmp_path / "short.txt")], tokenizer="no-such/tokenizer", cache_dir=cache)
    (tmp_path / "x.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(ValueError, match="has no 'text' field"):
        read_documents([str(tmp_path / "x.jsonl")])
    blocked = tmp_path / "blocked"
    blocked.write_text("a file, not a directory")
    with pytest.raises(PermissionError, match="is not writable"):
        writable_dir(blocked / "sub")


def test_split_works_keeps_every_character():
    text = "TITLE ONE\n\nby William Shakespeare\nbody\nTHE ENDTITLE TWO\n\nby William Shakespeare\nmore\n"
    works = split_works(text)
    assert "".join(works) == text and works[1].startswith("TITLE TWO")


def test_batches_are_dicts_of_long_tensors(cache, tmp_path):
    (tmp_path / "a.txt").write_text(TEXT)
    data = TextDataModule(files=[str(tmp_path / "a.txt")], vocab_size=300, seq_len=8, batch_size=2, cache_dir=cache)
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {"input_ids"} and batch["input_ids"].dtype == torch.long


class SeenBatches(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, batch["input_ids"][:, :4].tolist()))


def test_first_epoch_order_is_random_samplers():
    """Same draw from the global RNG, same permutation: seeded runs keep their data order."""
    torch.manual_seed(3)
    expected = list(torch.utils.data.RandomSampler(range(50)))
    torch.manual_seed(3)
    assert list(EpochShuffle(50, 4, lambda: 0)) == expected


@pytest.mark.parametrize("interrupt_step", [3, 5])  # mid-epoch, and the epoch's last step
@pytest.mark.slow
def test_ctrl_c_and_resume_see_the_batches_of_the_uninterrupted_run(tmp_path, cache, interrupt_step):
    """6 batches per epoch, 10 steps: the interrupted and resumed run trains on the same batches in the same
    order (none repeated, none lost) and ends with the same weights."""
    (tmp_path / "a.txt").write_text(TEXT)

    def run(callbacks, ckpt_path=None):
        data = TextDataModule(files=[str(tmp_path / "a.txt")], vocab_size=300, seq_len=16, batch_size=4,
                              val_fraction=0.1, cache_dir=cache, max_train_tokens=16 * 4 * 6)  # fmt: skip
        pl.seed_everything(0)
        module = LanguageModelTraining(student=tiny(vocab_size=data.vocab_size), optimizer=adam)
        t = pl.Trainer(max_steps=10, logger=False, enable_progress_bar=False, enable_model_summary=False,
                       limit_val_batches=0, default_root_dir=tmp_path, callbacks=callbacks)  # fmt: skip
        t.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module

    full = SeenBatches()
    uninterrupted = run([full])
    first, second = SeenBatches(), SeenBatches()
    with pytest.raises(SystemExit):
        run([first, CheckpointOnInterrupt(dirpath=str(tmp_path)), InterruptAt(interrupt_step)])
    assert first.seen[-1][0] == interrupt_step
    resumed = run([second], ckpt_path=tmp_path / "interrupted.ckpt")
    assert first.seen + second.seen == full.seen
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


def test_max_train_tokens_tokenizes_only_the_documents_its_blocks_come_from(tmp_path):
    """The kept blocks equal the first blocks of the whole split, and the documents after them are never
    tokenized (a quick run over a large corpus starts at once)."""
    from helpers import small_text_data

    from lit_distill.data.text import pack

    whole = small_text_data(tmp_path, seq_len=16)
    everything = pack(whole.train_documents, whole.tokenizer, 16, "training")
    seen = []
    for kept in (3, 9):
        data = TextDataModule(files=whole.files, vocab_size=300, seq_len=16, val_fraction=0.25,
                              cache_dir=str(tmp_path / "cache"), max_train_tokens=16 * kept + 5)  # fmt: skip
        call = data.tokenizer.__class__.__call__

        def spy(tokenizer, text, *args, _call=call, **kwargs):
            seen.extend([text] if isinstance(text, str) else text)
            return _call(tokenizer, text, *args, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(data.tokenizer.__class__, "__call__", spy)
            data.setup()
        assert torch.equal(data.train_blocks, everything[:kept])
        assert whole.train_documents[-1] not in seen  # 6 training works of about 17 blocks each: one or two read
        seen.clear()
