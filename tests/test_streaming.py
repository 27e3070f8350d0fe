"""StreamingTextDataModule: the held-out split on the stream, the readers' shares, the shuffle, exact resume, equal
batch counts over processes, bad input.

The corpora are tiny jsonl files whose document i is made of its own words ``d{i}w0 d{i}w1 ...``, under a word-level
tokenizer (one token per word), so that every token names its document. The references below read the files with
``json``, split and pack by hand, and know nothing of ``datasets`` or the module.
"""

import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import InterruptAt, adam, tiny
from lightning.pytorch.callbacks import Callback

from lit_distill.callbacks import CheckpointOnInterrupt
from lit_distill.data.streaming import StreamingTextDataModule, stream_sources
from lit_distill.modules import LanguageModelTraining

DOCS, WORDS = 48, 40


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> str:
    """The directory of a saved word-level tokenizer: ``<eos>`` (id 0), ``<unk>``, then the words ``d{i}w{j}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<eos>", "<unk>", *(f"d{i}w{j}" for i in range(DOCS) for j in range(WORDS))]
    tok = Tokenizer(models.WordLevel({w: n for n, w in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    directory = tmp_path_factory.mktemp("words")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(directory)
    return str(directory)


def document(i: int, length: int) -> str:
    return " ".join(f"d{i}w{j}" for j in range(length))


def write_corpus(path: Path, lengths: list[int], blank_at=(), field="text") -> str:
    """Document i of ``lengths[i]`` words as a jsonl record; blank records before the positions in ``blank_at``."""
    with open(path, "w") as f:
        for i, length in enumerate(lengths):
            if i in blank_at:
                f.write(json.dumps({field: "   "}) + "\n")
            f.write(json.dumps({field: document(i, length)}) + "\n")
    return str(path)


def token(word: str) -> int:
    """The id of ``d{i}w{j}`` in the ``words`` tokenizer."""
    i, j = word[1:].split("w")
    return 2 + int(i) * WORDS + int(j)


def split(path: str, val_fraction: float) -> tuple[list[list[int]], list[list[int]]]:
    """(training, held-out) documents of a corpus as token ids with EOS: non-empty document i is held out when
    ``i % k == k // 2``."""
    texts = [json.loads(line)["text"] for line in Path(path).read_text().splitlines()]
    texts = [t for t in texts if t.strip()]
    k = round(1 / val_fraction)
    ids = [[token(word) for word in text.split()] + [0] for text in texts]
    return [d for i, d in enumerate(ids) if i % k != k // 2], [d for i, d in enumerate(ids) if i % k == k // 2]


def packed(documents: list[list[int]], seq_len: int) -> list[tuple[int, ...]]:
    flat = [t for d in documents for t in d]
    return [tuple(flat[i : i + seq_len]) for i in range(0, len(flat) - seq_len + 1, seq_len)]


def rows(batches) -> list[tuple[int, ...]]:
    return [tuple(row) for batch in batches for row in batch["input_ids"].tolist()]


def documents_in(rows_: list[tuple[int, ...]]) -> set[int]:
    """The documents whose words ``rows_`` hold (EOS names none)."""
    return {(t - 2) // WORDS for row in rows_ for t in row if t >= 2}


def stub_trainer(rank=0, world=1, epoch=0, done=0, strategy=None) -> SimpleNamespace:
    """What the data module reads of its trainer, at the start of an epoch (``done`` batches already trained)."""
    progress = SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=SimpleNamespace(current=SimpleNamespace(
        ready=done))))  # fmt: skip
    return SimpleNamespace(
        global_rank=rank, world_size=world, current_epoch=epoch, fit_loop=progress, strategy=strategy
    )


def make(path, words, **kwargs) -> StreamingTextDataModule:
    settings = {"seq_len": 8, "batch_size": 1, "val_fraction": 0.2, "shuffle_buffer": 64, **kwargs}
    return StreamingTextDataModule([str(path)], tokenizer=words, **settings)


def test_reference_tokens_are_the_tokenizers(tmp_path, words):
    """The hand-made ids of ``split`` are the tokenizer's (the other tests lean on them)."""
    from transformers import AutoTokenizer

    corpus = write_corpus(tmp_path / "c.jsonl", [3, 5, 4])
    tok = AutoTokenizer.from_pretrained(words)
    train, val = split(corpus, 0.5)
    texts = [document(0, 3), document(2, 4), document(1, 5)]
    assert train + val == [[*tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id] for t in texts]


def test_validation_holds_out_every_kth_non_empty_document_and_reads_at_most_val_rows(tmp_path, words):
    """k = 5: non-empty documents 2, 7, 12, ... are validation (blank records do not count), read in order and
    cut at ``val_rows``; training packs exactly the others (one reader, batches of one row: nothing dropped)."""
    lengths = [3 + (i * 7) % 13 for i in range(30)]
    corpus = write_corpus(tmp_path / "c.jsonl", lengths, blank_at=(4, 10))
    train, val = split(corpus, 0.2)
    data = make(corpus, words, val_rows=3)
    val_rows, train_rows = rows(data.val_dataloader()), rows(data.train_dataloader())
    assert len(packed(val, 8)) > 3 and val_rows == packed(val, 8)[:3]
    assert Counter(train_rows) == Counter(packed(train, 8))
    held_out = set(range(2, 30, 5))  # document i is the i-th non-empty one
    assert documents_in(val_rows) <= held_out and not documents_in(val_rows) & documents_in(train_rows)
    assert documents_in(train_rows) == set(range(30)) - held_out


def test_validation_reads_no_further_than_its_rows_and_a_record_without_the_field_is_named(tmp_path, words):
    """The last record has no ``text``: validation (2 rows, near the start) never reaches it; training does."""
    corpus = write_corpus(tmp_path / "c.jsonl", [12] * 20)
    with open(corpus, "a") as f:
        f.write(json.dumps({"body": "d0w0"}) + "\n")
    data = make(corpus, words, val_rows=2, tokenize_batch=1)
    assert len(rows(data.val_dataloader())) == 2
    with pytest.raises(ValueError, match=r"record 21 has no 'text' field \(set text_field\); keys: \['body'\]"):
        rows(data.train_dataloader())


def test_two_workers_pack_disjoint_shares_of_the_training_documents(tmp_path, words):
    """Training document t goes to worker t % 2, which packs its share on its own: 16 documents of 12 tokens,
    8 per worker, 12 rows each, 6 batches of 2 each: every row of both shares is seen once, nothing else."""
    corpus = write_corpus(tmp_path / "c.jsonl", [11] * 20)
    train, _ = split(corpus, 0.2)
    data = make(corpus, words, batch_size=2, num_workers=2, shuffle_buffer=4)
    seen = rows(data.train_dataloader())
    assert len(seen) == len(set(seen)) == 24
    assert Counter(seen) == Counter(packed(train[0::2], 8) + packed(train[1::2], 8))


def test_shuffle_is_set_by_seed_epoch_and_reader(tmp_path, words):
    """A buffer of one row keeps the packing order (the leftover carried over documents and tokenizer calls);
    a larger buffer gives a permutation that repeats for the same seed and epoch and changes with either."""
    corpus = write_corpus(tmp_path / "c.jsonl", [3 + (i * 5) % 11 for i in range(25)])
    train, _ = split(corpus, 0.2)
    reference = packed(train, 8)
    assert rows(make(corpus, words, shuffle_buffer=1, tokenize_batch=3).train_dataloader()) == reference
    data = make(corpus, words, shuffle_buffer=8, tokenize_batch=3)
    first = rows(data.train_dataloader())
    assert first == rows(data.train_dataloader()) and first != reference and sorted(first) == sorted(reference)
    data.trainer = stub_trainer(epoch=1)
    second_epoch = rows(data.train_dataloader())
    other_seed = rows(make(corpus, words, shuffle_buffer=8, seed=1).train_dataloader())
    assert sorted(second_epoch) == sorted(other_seed) == sorted(reference)
    assert second_epoch != first and other_seed != first
    assert data.state_dict()["seed"] == 0


def test_every_batch_asks_all_processes_and_the_epoch_ends_when_any_is_out(tmp_path, words):
    """As process 1 of 2: one collective per batch (and one for the end), stopping when it says one is out;
    this process packs the odd training documents."""
    corpus = write_corpus(tmp_path / "c.jsonl", [11] * 20)
    train, _ = split(corpus, 0.2)
    asked = []

    def reduce_boolean_decision(missing, all=True):
        asked.append((missing, all))
        return missing or len(asked) == 4

    data = make(corpus, words)
    data.trainer = stub_trainer(
        rank=1, world=2, strategy=SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision)
    )
    seen = rows(data.train_dataloader())
    assert asked == [(False, False)] * 4 and len(seen) == 3
    assert set(seen) <= set(packed(train[1::2], 8))
    data.trainer.strategy.reduce_boolean_decision = lambda missing, all=True: missing
    assert Counter(rows(data.train_dataloader())) == Counter(packed(train[1::2], 8))


@pytest.mark.parametrize(("workers", "done"), [(0, 4), (2, 3), (2, 4)])
def test_an_epoch_restarted_after_some_batches_goes_on_with_the_next_batch(tmp_path, words, workers, done):
    """The batches of an epoch the trainer says are done are skipped, each worker skipping its own: the rest is
    the whole epoch's tail (with two workers and an odd number done, worker 1 must come first)."""
    corpus = write_corpus(tmp_path / "c.jsonl", [11] * 10)
    data = make(corpus, words, batch_size=2, num_workers=workers, shuffle_buffer=4)
    data.trainer = stub_trainer(epoch=1)
    whole = [batch["input_ids"].tolist() for batch in data.train_dataloader()]
    data.trainer = stub_trainer(epoch=1, done=done)
    assert len(whole) == 6 and [batch["input_ids"].tolist() for batch in data.train_dataloader()] == whole[done:]


class SeenBatches(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, trainer.global_step, batch["input_ids"].tolist()))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("workers", "interrupt_step"), [(0, 3), (2, 8)], ids=["in-process-epoch-0", "2-workers-epoch-1"]
)
def test_resume_mid_epoch_sees_the_batches_of_the_uninterrupted_run(tmp_path, words, workers, interrupt_step):
    """Two epochs of 6 batches; interrupted after step 3 (epoch 0) or step 8 (epoch 1, an odd number of batches done
    there, so the two workers trade places), then resumed with a new data module and trainer: the batches before
    and after the resume are the uninterrupted run's, and so are the weights."""
    corpus = write_corpus(tmp_path / "c.jsonl", [11] * 10)  # 8 training documents of 12 tokens: 12 rows

    def run(callbacks, ckpt_path=None):
        data = make(corpus, words, batch_size=2, num_workers=workers, shuffle_buffer=4)
        pl.seed_everything(0)
        module = LanguageModelTraining(student=tiny(vocab_size=data.vocab_size), optimizer=adam)
        t = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                       limit_val_batches=0, default_root_dir=tmp_path, callbacks=callbacks)  # fmt: skip
        t.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module

    full = SeenBatches()
    uninterrupted = run([full])
    assert [epoch for epoch, _, _ in full.seen] == [0] * 6 + [1] * 6
    first, second = SeenBatches(), SeenBatches()
    with pytest.raises(SystemExit):
        run([first, CheckpointOnInterrupt(dirpath=str(tmp_path)), InterruptAt(interrupt_step)])
    assert first.seen[-1][1] == interrupt_step
    resumed = run([second], ckpt_path=tmp_path / "interrupted.ckpt")
    assert first.seen + second.seen == full.seen
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


def test_resuming_with_other_data_is_refused(tmp_path, words):
    """Another file, the same file grown, another seq_len: a clear error naming both; the same data resumes."""
    corpus = write_corpus(tmp_path / "c.jsonl", [11] * 20)
    other = write_corpus(tmp_path / "other.jsonl", [11] * 20)
    state = make(corpus, words, seed=7).state_dict()
    for data in (make(other, words), make(corpus, words, seq_len=4)):
        with pytest.raises(ValueError, match="resuming a streamed run with other data") as err:
            data.load_state_dict(state)
        assert str(Path(corpus).resolve()) in str(err.value) and "this run reads" in str(err.value)
    same = make(corpus, words)
    same.load_state_dict(state)
    assert same.seed == 7
    with open(corpus, "a") as f:
        f.write(json.dumps({"text": document(30, 5)}) + "\n")
    with pytest.raises(ValueError, match="other data"):
        make(corpus, words).load_state_dict(state)


def test_reads_gzipped_jsonl_parquet_and_text_files_in_order(tmp_path, words):
    """jsonl.gz and parquet records by ``text_field``, a ``.txt`` file as one document, blanks dropped."""
    import datasets

    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"body": document(i, 3)}) + "\n" for i in (0, 1)))
    datasets.Dataset.from_dict({"body": [document(2, 4), " ", document(3, 2)]}).to_parquet(tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text(document(4, 5) + "\n" + document(5, 1) + "\n")
    files = [str(tmp_path / name) for name in ("a.jsonl.gz", "b.parquet", "c.txt")]
    data = StreamingTextDataModule(files, tokenizer=words, text_field="body", seq_len=4)
    expected = [document(0, 3), document(1, 3), document(2, 4), document(3, 2)]
    assert list(data.stream.documents()) == [*expected, document(4, 5) + "\n" + document(5, 1) + "\n"]
    assert data.special_tokens == {"eos_token_id": 0} and data.vocab_size == 2 + DOCS * WORDS


def test_clear_errors(tmp_path, words):
    corpus = write_corpus(tmp_path / "c.jsonl", [11] * 4)
    with pytest.raises(ValueError, match="needs files"):
        StreamingTextDataModule([], tokenizer=words)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl does not exist"):
        StreamingTextDataModule([corpus, str(tmp_path / "missing.jsonl")], tokenizer=words)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        stream_sources(["missing.jsonl"])
    with pytest.raises(ValueError, match="needs tokenizer="):
        StreamingTextDataModule([corpus])
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"val_fraction must lie in \(0, 1\)"):
            StreamingTextDataModule([corpus], tokenizer=words, val_fraction=fraction)
    with pytest.raises(ValueError, match="seq_len >= 2"):
        StreamingTextDataModule([corpus], tokenizer=words, seq_len=1)
    assert stream_sources(["HuggingFaceFW/fineweb-edu"]) == [{"hub": "HuggingFaceFW/fineweb-edu"}]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
def test_two_processes_with_uneven_shards_run_the_same_steps_on_their_own_rows(tmp_path, words):
    """DDP on two CPU processes (tests/streaming_ddp_worker.py): process 0 packs the long training documents (24
    rows, 12 batches), process 1 the short ones (8 rows, 4 batches). Both stop after 4 steps (no hang), each on
    rows of its own reference packing, none seen twice."""
    lengths, trained = [], 0
    for i in range(20):  # training document t is process t % 2's
        held = i % 5 == 2
        lengths.append(5 if held else (23 if trained % 2 == 0 else 7))
        trained += not held
    corpus = write_corpus(tmp_path / "c.jsonl", lengths)
    train, _ = split(corpus, 0.2)
    reference = [packed(train[0::2], 8), packed(train[1::2], 8)]
    assert [len(r) // 2 for r in reference] == [12, 4]
    out = tmp_path / "ddp.pt"
    worker = [sys.executable, "streaming_ddp_worker.py", corpus, words, str(out)]
    proc = subprocess.run(worker, capture_output=True, text=True, timeout=600, cwd=str(Path(__file__).parent))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out, weights_only=False)
    assert result["steps"] == [4, 4] and [len(batches) for batches in result["seen"]] == [4, 4]
    seen = [[tuple(row) for batch in batches for row in batch] for batches in result["seen"]]
    for rank in (0, 1):
        assert len(set(seen[rank])) == 8 and set(seen[rank]) <= set(reference[rank])
    assert not set(seen[0]) & set(seen[1])
