"""The teacher cache: the signal's math, writing (shards, manifest, resume), reading, and its refusals."""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import small_text_data, tiny
from safetensors.torch import load_file

from lit_distill.data.teacher_cache import TeacherCacheDataModule, TeacherSignal, cache_teacher, sparse_signal
from lit_distill.data.teacher_cache.manifest import MANIFEST, CacheManifest, shard_name

SEQ_LEN = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return small_text_data(tmp_path_factory.mktemp("corpus"), seq_len=SEQ_LEN)


def teacher_for(data, seed=1):
    return tiny(hidden=32, seed=seed, vocab_size=data.vocab_size)


def write(data, directory, method="topk", **kwargs):
    signal_args = {k: kwargs.pop(k) for k in ("k", "samples", "temperature", "seed") if k in kwargs}
    signal = TeacherSignal(teacher_for(data), method=method, **signal_args)
    from helpers import trainer

    return cache_teacher(signal, data, directory, trainer=trainer(use_distributed_sampler=False), **kwargs)


# ------------------------------------------------------------------------------------------- the signal
def test_topk_signal_is_the_largest_log_probabilities_at_the_temperature():
    logits = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(0)) * 3
    ids, logprobs = sparse_signal(logits, method="topk", k=6, temperature=2.0)
    reference = torch.log_softmax(logits.double() / 2.0, -1)
    expected = reference.sort(-1, descending=True)
    assert torch.equal(ids, expected.indices[..., :6])
    torch.testing.assert_close(logprobs.double(), expected.values[..., :6], rtol=0, atol=1e-6)


def test_sampled_signal_stores_each_drawn_token_once_with_its_share():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    ids, shares = sparse_signal(logits, method="sampled", k=16, generator=torch.Generator().manual_seed(7))
    draws = torch.multinomial(
        torch.softmax(logits, -1), 16, replacement=True, generator=torch.Generator().manual_seed(7)
    )
    for row in range(4):
        counts = collections.Counter(draws[row].tolist())
        stored = {int(i): math.exp(float(s)) for i, s in zip(ids[row], shares[row], strict=True) if i >= 0}
        assert stored == pytest.approx({token: n / 16 for token, n in counts.items()})
        assert (shares[row][ids[row] < 0] == -math.inf).all()


def test_sampled_shares_average_to_the_teacher_probabilities():
    logits = torch.randn(2, 12, generator=torch.Generator().manual_seed(3))
    p = torch.softmax(logits.double(), -1)
    draws, samples = 400, 8
    total = torch.zeros_like(p)
    for seed in range(draws):
        ids, shares = sparse_signal(logits, method="sampled", k=samples, generator=torch.Generator().manual_seed(seed))
        dense = torch.zeros_like(p)
        dense.scatter_add_(-1, ids.clamp(min=0), torch.where(ids >= 0, shares.double().exp(), 0.0))
        total += dense
    # Each share is a mean of `samples` Bernoulli(p) draws: standard error sqrt(p (1 - p) / (samples * draws)).
    stderr = (p * (1 - p) / (samples * draws)).sqrt()
    assert ((total / draws - p).abs() <= 4 * stderr + 1e-12).all()


def test_signal_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        sparse_signal(torch.randn(2, 5), method="top", k=2)
    with pytest.raises(ValueError, match=r"k must be in \[1, 5\]"):
        sparse_signal(torch.randn(2, 5), method="topk", k=6)


# ------------------------------------------------------------------------------------------- writing
def test_cache_holds_the_teachers_signal_for_every_training_sequence(data, tmp_path):
    manifest = write(data, tmp_path, k=8, temperature=2.0, shard_sequences=5)
    settings = manifest.settings
    n = data.train_blocks.shape[0]
    assert (settings.sequences, settings.seq_len, settings.k, settings.temperature) == (n, SEQ_LEN, 8, 2.0)
    assert settings.vocab_size == data.vocab_size and manifest.tokens == n * SEQ_LEN
    assert [s["sequences"] for s in manifest.shards] == [5] * (n // 5) + ([n % 5] if n % 5 else [])
    teacher = teacher_for(data).eval()
    shard = load_file(tmp_path / shard_name(1))
    with torch.no_grad():
        logits = teacher(input_ids=data.train_blocks[5:10].long()).logits
    ids, logprobs = sparse_signal(logits, method="topk", k=8, temperature=2.0)
    assert torch.equal(shard["input_ids"].long(), data.train_blocks[5:10].long())
    assert torch.equal(shard["teacher_ids"].long(), ids)
    # fp16 storage: log-probabilities in [-20, 0] are kept to 2^-6 at worst.
    torch.testing.assert_close(shard["teacher_logprobs"].float(), logprobs, rtol=0, atol=2**-6)
    assert shard["teacher_ids"].dtype == torch.int32 and shard["teacher_logprobs"].dtype == torch.float16
    per_token = sum(t.element_size() * t[0, 0].numel() for t in shard.values())
    assert per_token <= 6 * 8 + 8  # the bytes per token at K slots that docs/techniques.md states


def test_a_rerun_resumes_at_the_missing_shards(data, tmp_path, monkeypatch):
    first = write(data, tmp_path, method="sampled", samples=8, shard_sequences=4, seed=3)
    (tmp_path / shard_name(2)).unlink()
    (tmp_path / MANIFEST).unlink()
    seen = []
    original = TeacherSignal.predict_step
    monkeypatch.setattr(
        TeacherSignal, "predict_step", lambda self, b, i=0: seen.extend(b["index"].tolist()) or original(self, b, i)
    )
    again = write(data, tmp_path, method="sampled", samples=8, shard_sequences=4, seed=3)
    assert seen == list(range(8, 12))  # only shard 2's sequences
    assert again.shards == first.shards  # the same bytes: the draws are seeded per sequence


def test_a_cache_of_other_settings_is_not_resumed(data, tmp_path):
    write(data, tmp_path, k=4, shard_sequences=50)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"other settings \(k differ\)"):
        write(data, tmp_path, k=6, shard_sequences=50)


def shared_pass(data, directories, teacher=None, **kwargs):
    """A top-k (k=8, T=2) and a sampled (8 draws, T=1, seed 3) cache of one teacher, in one pass."""
    from helpers import trainer

    teacher = teacher or teacher_for(data)
    signals = [
        TeacherSignal(teacher, k=8, temperature=2.0),
        TeacherSignal(teacher, method="sampled", samples=8, seed=3),
    ]
    return cache_teacher(signals, data, directories, trainer=trainer(use_distributed_sampler=False), **kwargs)


def test_one_teacher_pass_writes_the_caches_of_one_pass_each(data, tmp_path):
    alone = [
        write(data, tmp_path / "topk", k=8, temperature=2.0, shard_sequences=5),
        write(data, tmp_path / "sampled", method="sampled", samples=8, seed=3, shard_sequences=5),
    ]
    teacher, forwards = teacher_for(data), []
    teacher.register_forward_hook(lambda module, args, out: forwards.append(1))
    together = shared_pass(data, [tmp_path / "a", tmp_path / "b"], teacher, shard_sequences=5, batch_size=4)
    assert [m.shards for m in together] == [m.shards for m in alone]  # byte for byte (each shard's sha256)
    assert [m.settings for m in together] == [m.settings for m in alone]
    assert len(forwards) == -(-data.train_blocks.shape[0] // 4)  # one teacher forward per batch for both


def test_a_shared_pass_resumes_the_shards_either_cache_lacks(data, tmp_path, monkeypatch):
    directories = [tmp_path / "a", tmp_path / "b"]
    first = shared_pass(data, directories, shard_sequences=4)
    (directories[1] / shard_name(2)).unlink()
    (directories[1] / MANIFEST).unlink()
    kept = (directories[0] / shard_name(2)).stat().st_mtime_ns
    seen = []
    original = TeacherSignal.teacher_logits
    monkeypatch.setattr(
        TeacherSignal, "teacher_logits", lambda self, b: seen.extend(b["index"].tolist()) or original(self, b)
    )
    again = shared_pass(data, directories, shard_sequences=4)
    assert seen == list(range(8, 12))  # only shard 2's sequences, for both caches
    assert [m.shards for m in again] == [m.shards for m in first]
    assert (directories[0] / shard_name(2)).stat().st_mtime_ns == kept  # the cache that had it keeps its file


def test_a_shared_pass_refuses_other_teachers_and_unmatched_directories(data, tmp_path):
    from helpers import trainer

    signals = [TeacherSignal(teacher_for(data)), TeacherSignal(teacher_for(data))]
    with pytest.raises(ValueError, match="signals written in one teacher pass must share one teacher"):
        cache_teacher(signals, data, [tmp_path / "a", tmp_path / "b"], trainer=trainer(use_distributed_sampler=False))
    with pytest.raises(ValueError, match="cache_teacher needs one distinct directory per signal, got 2 signal"):
        shared_pass(data, [tmp_path / "a"])
    with pytest.raises(ValueError, match="cache_teacher needs one distinct directory per signal"):
        shared_pass(data, [tmp_path / "a", tmp_path / "a"])
    assert not (tmp_path / "a").exists()  # nothing written


# ------------------------------------------------------------------------------------------- reading
def test_data_module_serves_the_cached_signal(data, tmp_path):
    write(data, tmp_path, k=4, shard_sequences=3)
    cached = TeacherCacheDataModule(str(tmp_path), batch_size=2)
    assert cached.vocab_size == data.vocab_size and cached.special_tokens == data.special_tokens
    item = cached.train_set[4]  # shard 1, row 1
    shard = load_file(tmp_path / shard_name(1))
    assert torch.equal(item["input_ids"], shard["input_ids"][1].long())
    assert torch.equal(item["teacher_logprobs"], shard["teacher_logprobs"][1].float())
    assert item["teacher_ids"].shape == (SEQ_LEN, 4) and item["attention_mask"].all()
    batch = next(iter(cached.train_dataloader()))
    assert batch["teacher_ids"].shape == (2, SEQ_LEN, 4)
    cached.setup()
    assert torch.equal(cached.val_blocks, data.val_blocks.long())


def test_a_damaged_cache_is_refused_naming_what(data, tmp_path):
    write(data, tmp_path, k=4, shard_sequences=3)
    path = tmp_path / shard_name(0)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"shard shard-00000.safetensors is truncated or corrupt"):
        TeacherCacheDataModule(str(tmp_path))
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard shard-00000\.safetensors is missing"):
        TeacherCacheDataModule(str(tmp_path))
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    (tmp_path / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version is 99"):
        TeacherCacheDataModule(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"has no manifest\.json"):
        TeacherCacheDataModule(str(tmp_path / "elsewhere"))


def test_a_cache_of_another_tokenizer_is_refused(data, tmp_path):
    from helpers import permuted_tokenizer

    write(data, tmp_path / "cache", k=4, shard_sequences=50)
    other = permuted_tokenizer(tmp_path / "cache" / "tokenizer", tmp_path / "other")
    with pytest.raises(ValueError, match="written with another tokenizer"):
        TeacherCacheDataModule(str(tmp_path / "cache"), tokenizer=str(other))
    assert CacheManifest.read(tmp_path / "cache").settings.k == 4


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
@pytest.mark.parametrize("shared", [False, True], ids=["one-cache", "two-caches-one-pass"])
def test_two_processes_write_the_cache_one_process_writes(tmp_path, shared):
    worker = Path(__file__).parent / "cache_worker.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    manifests = []
    for devices in (1, 2):
        out = tmp_path / f"cache-{devices}"
        proc = subprocess.run(
            [sys.executable, str(worker), str(devices), str(tmp_path), str(out), *(["shared"] if shared else [])],
            capture_output=True, text=True, timeout=600, env=env, cwd=worker.parent,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        caches = [out, Path(f"{out}-topk")] if shared else [out]
        manifests.append([json.loads((cache / MANIFEST).read_text()) for cache in caches])
    for single, ddp in zip(*manifests, strict=True):
        assert len(ddp["shards"]) == len(single["shards"]) >= 3
        assert ddp["shards"] == single["shards"]  # the same bytes: each shard's draws are seeded per sequence


def test_several_processes_need_their_own_sampler(data, tmp_path):
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)  # not launched
    with pytest.raises(ValueError, match=r"needs Trainer\(use_distributed_sampler=False\)"):
        cache_teacher(TeacherSignal(teacher_for(data)), data, tmp_path, trainer=trainer)
    assert not (tmp_path / MANIFEST).exists()
