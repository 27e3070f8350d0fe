"""A teacher cache over chat data: the signal stored only where a learned token is predicted, read back as the
chat batches, and OfflineDistillation on it.

The oracle runs the teacher on each conversation alone (no padding, no batch) and takes its top-k at the positions
whose next token is learned, found from the chat data's labels by hand.
"""

import math

import pytest
import torch
from helpers import CHAT_WORDS, save_chat_tokenizers, tiny, trainer, write_jsonl
from safetensors.torch import load_file

from lit_distill import sparse_distillation_loss
from lit_distill.data import ChatDataModule, PromptDataModule
from lit_distill.data.teacher_cache import TeacherCacheDataModule, TeacherSignal, cache_teacher
from lit_distill.data.teacher_cache.manifest import shard_name
from lit_distill.losses import DistillationLoss
from lit_distill.modules import OfflineDistillation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SPECIAL = ["<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
K, TEMPERATURE = 6, 2.0


def conversation(i):
    """Conversations of 1 to 3 exchanges, words varying with i: rows of different lengths."""
    messages = [{"role": "system", "content": "be brief"}]
    for t in range(1 + i % 3):
        words = " ".join(CHAT_WORDS[(i + t + j) % len(CHAT_WORDS)] for j in range(2 + (i * 7 + t) % 5))
        messages += [{"role": "user", "content": f"{words} ?"}, {"role": "assistant", "content": f"{i} {words}"}]
    return {"messages": messages}


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tokenizer = save_chat_tokenizers(root / "tokenizers", SPECIAL, {"plain": TEMPLATE})["plain"]
    train = write_jsonl(root / "train.jsonl", [conversation(i) for i in range(11)])
    val = write_jsonl(root / "val.jsonl", [conversation(100 + i) for i in range(3)])
    data = ChatDataModule(train, val, tokenizer=tokenizer, batch_size=4, max_seq_length=48, cache_dir=str(root / "c"))
    data.setup()
    teacher = tiny(hidden=32, seed=1, vocab_size=data.vocab_size, max_position_embeddings=64).eval()
    with torch.no_grad():  # a confident teacher: its divergence from a random student is far from 0
        teacher.lm_head.weight.mul_(30)
    return data, teacher


def write(data, teacher, directory, **kwargs):
    signal = TeacherSignal(teacher, k=K, temperature=TEMPERATURE, vocab_size=data.vocab_size)
    return cache_teacher(signal, data, directory, trainer=trainer(use_distributed_sampler=False), **kwargs)


def oracle(data, teacher, index):
    """(ids, labels, positions, top-k ids, top-k logprobs) of training conversation ``index``, run alone."""
    row = data.train_rows[index]
    ids, labels = torch.as_tensor(row["input_ids"]).long(), torch.as_tensor(row["labels"]).long()
    positions = torch.tensor([t for t in range(len(ids) - 1) if labels[t + 1] != -100])
    with torch.no_grad():
        logits = teacher(input_ids=ids[None]).logits[0, :, : data.vocab_size]
    values, top = torch.log_softmax(logits / TEMPERATURE, -1).topk(K, -1)
    return ids, labels, positions, top[positions], values[positions]


def test_a_chat_cache_stores_the_signal_only_where_a_learned_token_is_predicted(chat, tmp_path):
    data, teacher = chat
    manifest = write(data, teacher, tmp_path / "cache", shard_sequences=4, batch_size=3)
    settings = manifest.settings
    assert (settings.layout, settings.sequences, settings.format_version, len(manifest.shards)) == ("rows", 11, 2, 3)
    expected = [oracle(data, teacher, i) for i in range(11)]
    assert manifest.tokens == sum(len(e[0]) for e in expected)
    assert manifest.signal_positions == sum(len(e[2]) for e in expected) < manifest.tokens / 2
    assert manifest.validation_sequences == 3
    shard = load_file(tmp_path / "cache" / shard_name(1))  # conversations 4..7: flat, only their signal positions
    assert shard["lengths"].tolist() == [len(e[0]) for e in expected[4:8]]
    assert shard["teacher_ids"].shape == (sum(len(e[2]) for e in expected[4:8]), K)
    assert torch.equal(shard["input_ids"].long(), torch.cat([e[0] for e in expected[4:8]]))

    cached = TeacherCacheDataModule(str(tmp_path / "cache"), batch_size=4)
    for index, (ids, labels, positions, top, values) in enumerate(expected):
        row = cached.train_set[index]
        assert torch.equal(row["input_ids"], ids) and torch.equal(row["labels"], labels)
        assert torch.equal(row["teacher_ids"][positions], top)  # padded batches gave the same top-k as alone
        torch.testing.assert_close(row["teacher_logprobs"][positions], values, atol=4e-3, rtol=1e-3)  # fp16
        elsewhere = torch.ones(len(ids), dtype=torch.bool)
        elsewhere[positions] = False
        assert (row["teacher_ids"][elsewhere] == -1).all() and (row["teacher_logprobs"][elsewhere] == -math.inf).all()


def test_a_chat_cache_resumes_its_missing_shard_byte_for_byte(chat, tmp_path):
    data, teacher = chat
    write(data, teacher, tmp_path / "cache", shard_sequences=4)
    whole = (tmp_path / "cache" / shard_name(2)).read_bytes()
    (tmp_path / "cache" / shard_name(2)).unlink()
    (tmp_path / "cache" / "manifest.json").unlink()
    write(data, teacher, tmp_path / "cache", shard_sequences=4)
    assert (tmp_path / "cache" / shard_name(2)).read_bytes() == whole


def test_offline_distillation_on_a_chat_cache_is_the_loss_on_the_teachers_own_signal(chat, tmp_path):
    data, teacher = chat
    write(data, teacher, tmp_path / "cache", shard_sequences=4)
    cached = TeacherCacheDataModule(str(tmp_path / "cache"), batch_size=4)
    batch = cached.collate([cached.train_set[i] for i in (2, 5, 9)])
    loss = DistillationLoss(temperature=TEMPERATURE, alpha=0.5)
    module = OfflineDistillation(tiny(hidden=32, seed=3, vocab_size=data.vocab_size), loss=loss)
    out = module.compute_loss(batch)
    # The reference: the chat batch of the same conversations and the teacher's top-k of every position, which
    # the learned labels mask wherever the cache stores nothing.
    chat_batch = data.collate([data.train_rows[i] for i in (2, 5, 9)])
    torch.testing.assert_close(batch["labels"], chat_batch["labels"], rtol=0, atol=0)
    with torch.no_grad():
        logits = teacher(input_ids=chat_batch["input_ids"]).logits[..., : data.vocab_size]
    values, top = torch.log_softmax(logits / TEMPERATURE, -1).topk(K, -1)
    student = module.student(input_ids=chat_batch["input_ids"], attention_mask=chat_batch["attention_mask"]).logits
    labels = chat_batch["labels"][:, 1:].masked_fill(chat_batch["attention_mask"][:, 1:] == 0, -100)
    reference = sparse_distillation_loss(
        student[:, :-1], top[:, :-1], values[:, :-1].half().float(), labels, temperature=TEMPERATURE, alpha=0.5,
        tail=True, reduction="sum",
    )  # fmt: skip
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-4, atol=1e-4)
    assert float(out.soft) > 0.5  # the soft term weighs in the comparison
    assert int(out.num_tokens) == int((labels != -100).sum())


def test_offline_distillation_trains_on_a_chat_cache_and_validates_on_the_learned_tokens(chat, tmp_path):
    data, teacher = chat
    write(data, teacher, tmp_path / "cache", shard_sequences=4)
    cached = TeacherCacheDataModule(str(tmp_path / "cache"), batch_size=4)
    module = OfflineDistillation(
        tiny(hidden=32, seed=3, vocab_size=data.vocab_size),
        loss=DistillationLoss(temperature=TEMPERATURE, alpha=0.5),
        optimizer=lambda params: torch.optim.AdamW(params, lr=3e-3),
    )
    run = trainer(max_steps=2, limit_val_batches=1, val_check_interval=2)
    run.fit(module, datamodule=cached)
    assert run.global_step == 2 and math.isfinite(float(run.callback_metrics["train/loss"]))
    # validation: the student's cross-entropy on the held-out conversations' assistant tokens only
    val_batch = next(iter(data.val_dataloader()))
    with torch.no_grad():
        logits = module.student(input_ids=val_batch["input_ids"], attention_mask=val_batch["attention_mask"]).logits
    labels = val_batch["labels"][:, 1:]
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100)
    torch.testing.assert_close(run.callback_metrics["val/loss"], reference, rtol=1e-4, atol=1e-4)


def test_a_packed_chat_data_module_caches_its_conversations_one_per_row(chat, tmp_path):
    data, teacher = chat
    packed = ChatDataModule(data.train, data.val, tokenizer=data.tokenizer.name_or_path, batch_size=4,
                            max_seq_length=48, cache_dir=str(data.cache_dir), packing=True)  # fmt: skip
    packed.setup()
    assert len(packed.train_set) < len(packed.train_rows) == 11
    manifest = write(packed, teacher, tmp_path / "cache")
    assert (manifest.settings.sequences, manifest.tokens) == (11, write(data, teacher, tmp_path / "alone").tokens)


def test_a_prompt_set_cannot_be_cached(chat, tmp_path):
    data, teacher = chat
    prompts = PromptDataModule(data.train, tokenizer=data.tokenizer.name_or_path, cache_dir=str(data.cache_dir))
    with pytest.raises(TypeError, match="cache_teacher reads a TextDataModule or a ChatDataModule"):
        write(prompts, teacher, tmp_path / "cache")
