"""A teacher cache across tokenizers: the teacher reads its own tokenization of the student's rows, its signal is
binned into the student's vocabulary and stored at the student's boundary positions (empty slots elsewhere), and
OfflineDistillation trains the student on it with no teacher in memory.

The data module here is a stand-in for a text data module built with ``teacher_tokenizer=``: the student's blocks
of ``small_text_data`` with the batch keys of issue 26's spec made by hand (``helpers.cross_tokenizer_text_batch``).
The oracle runs the teacher on each row alone (no padding, no batch), takes its softmax in float64 at the
boundary positions, bins it with numpy through ``teacher_to_student``, tempers it and takes the top k itself. The
last test caches a real ``ChatDataModule(teacher_tokenizer=)`` (two chat templates) and finds its pairs from the two
rendered texts alone.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import (
    CHAT_PLAIN,
    CHAT_SPECIAL,
    chat_conversation,
    cross_tokenizer_text_batch,
    save_chat_tokenizers,
    small_text_data,
    tiny,
    trainer,
    write_jsonl,
)
from safetensors.torch import load_file
from tokenizers import ByteLevelBPETokenizer
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from lit_distill import sparse_distillation_loss
from lit_distill.data import ChatDataModule
from lit_distill.data.cross_tokenizer import align, build_vocabulary_map, token_bytes
from lit_distill.data.teacher_cache import TeacherCacheDataModule, TeacherSignal, cache_teacher
from lit_distill.data.teacher_cache.manifest import CacheManifest, shard_name
from lit_distill.data.tokenizers import load_tokenizer, train_bpe
from lit_distill.losses import DistillationLoss
from lit_distill.modules import OfflineDistillation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SEQ_LEN, K, TEMPERATURE = 16, 5, 2.0


class CrossText:
    """``small_text_data`` as a data module built with ``teacher_tokenizer=``: ``tokenizer`` is the student's,
    the training loader's collate makes the cross-tokenizer batch keys."""

    def __init__(self, data, teacher_tokenizer) -> None:
        self.tokenizer, self.teacher_tokenizer = data.tokenizer, teacher_tokenizer
        self.batch_size, self.vocab_size, self.cache_dir = data.batch_size, data.vocab_size, data.cache_dir
        self.train_blocks, self.val_blocks, self.fingerprint = data.train_blocks, data.val_blocks, data.fingerprint

    def setup(self, stage=None) -> None:
        pass

    def collate(self, rows):
        return cross_tokenizer_text_batch(rows, self.tokenizer, self.teacher_tokenizer)

    def train_dataloader(self) -> DataLoader:
        return DataLoader([], collate_fn=self.collate)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cross")
    data = small_text_data(root, seq_len=SEQ_LEN)
    # The teacher's BPE: trained mostly on a few of the words, so it spells them whole where the student splits
    # them and splits the others (tokens spanning several of the other side's, both ways: checked below)
    documents = ["mercy droppeth heaven beneath gentle quality strained " * 20] + [
        d[:200] for d in data.train_documents
    ]
    teacher_tokenizer = train_bpe(documents, 300, root / "teacher-bpe")
    teacher = tiny(hidden=32, seed=1, vocab_size=len(teacher_tokenizer)).eval()
    with torch.no_grad():  # a confident teacher: its binned top-k holds most of its mass
        teacher.lm_head.weight.mul_(20)
    data.tokenizer.save_pretrained(root / "student")  # loaded from a directory: messages name it
    data.tokenizer = load_tokenizer(str(root / "student"))
    return CrossText(data, teacher_tokenizer), teacher


def write(cross, teacher, directory, **kwargs):
    signal = TeacherSignal(teacher, k=K, temperature=TEMPERATURE, vocab_size=len(cross.teacher_tokenizer))
    return cache_teacher(signal, cross, directory, trainer=trainer(use_distributed_sampler=False), **kwargs)


def oracle(cross, teacher, ids: torch.Tensor):
    """Boundary positions of a student row and, at each, the top-K (ids, logprobs) of the teacher's distribution
    binned into the student's vocabulary at T=1 and tempered there: the teacher on the row alone, numpy binning."""
    s_table, t_table = token_bytes(cross.tokenizer), token_bytes(cross.teacher_tokenizer)
    teacher_ids = cross_tokenizer_text_batch([{"input_ids": ids}], cross.tokenizer, cross.teacher_tokenizer)
    teacher_ids = teacher_ids["teacher_input_ids"][0]
    groups = align(ids.tolist(), teacher_ids.tolist(), s_table, t_table)
    kept = groups.student_last + 1 < len(ids)
    student_at, teacher_at = groups.student_last[kept], groups.teacher_last[kept]
    with torch.no_grad():
        logits = teacher(input_ids=teacher_ids[None]).logits[0, :, : len(cross.teacher_tokenizer)].double()
    probs = torch.softmax(logits, -1)[teacher_at].numpy()
    mapping = build_vocabulary_map(cross.teacher_tokenizer, cross.tokenizer, cache_dir=cross.cache_dir)
    binned = np.zeros((len(teacher_at), len(cross.tokenizer)))
    for j, target in enumerate(mapping.teacher_to_student):
        if target >= 0:
            binned[:, target] += probs[:, j]
    binned = binned ** (1 / TEMPERATURE)  # binned at T=1, tempered in the student's space
    binned /= binned.sum(-1, keepdims=True)
    top = np.argsort(-binned, axis=-1, kind="stable")[:, :K]
    return student_at, groups, binned, top, np.log(np.take_along_axis(binned, top, -1))


def test_the_cache_holds_the_binned_teacher_signal_at_the_students_boundaries(setup, tmp_path):
    cross, teacher = setup
    manifest = write(cross, teacher, tmp_path, shard_sequences=4, batch_size=3)
    settings, n = manifest.settings, cross.train_blocks.shape[0]
    assert (settings.sequences, settings.seq_len, settings.k, settings.vocab_size) == (
        n,
        SEQ_LEN,
        K,
        len(cross.tokenizer),
    )
    assert settings.tokenizer_hash == build_vocabulary_map(cross.teacher_tokenizer, cross.tokenizer).student_hash
    assert manifest.cross_tokenizer and len(settings.teacher_tokenizer_hash) == 64 == len(settings.vocabulary_map_hash)
    stored_map = np.load(tmp_path / "vocab_map.npz")["teacher_to_student"]
    expected_map = build_vocabulary_map(cross.teacher_tokenizer, cross.tokenizer, cache_dir=cross.cache_dir)
    np.testing.assert_array_equal(stored_map, expected_map.teacher_to_student)
    assert (tmp_path / "teacher_tokenizer" / "tokenizer.json").exists()
    spanning = [0, 0]  # groups of several student tokens, of several teacher tokens: both occur
    boundaries = 0
    for index in (0, 5, n - 1):  # shards 0, 1 and the last
        shard = load_file(tmp_path / shard_name(index // 4))
        row = index % 4
        ids = cross.train_blocks[index].long()
        assert torch.equal(shard["input_ids"][row].long(), ids)  # the student's rows
        student_at, groups, binned, top, top_logprobs = oracle(cross, teacher, ids)
        spanning[0] += int((groups.student_count > 1).sum())
        spanning[1] += int((groups.teacher_count > 1).sum())
        stored_ids, stored = shard["teacher_ids"][row].long(), shard["teacher_logprobs"][row].double()
        at = torch.from_numpy(student_at)
        # fp16 storage: log-probabilities in [-20, 0] are kept to 2^-6 at worst
        np.testing.assert_allclose(stored[at].numpy(), top_logprobs, rtol=0, atol=2**-6)
        # each stored id holds that student token's binned mass (what a tie would swap keeps its value)
        held = np.log(np.take_along_axis(binned, stored_ids[at].numpy(), -1))
        np.testing.assert_allclose(stored[at].numpy(), held, rtol=0, atol=2**-6)
        assert (stored_ids[at] == torch.from_numpy(top)).float().mean() > 0.9
        empty = torch.ones(SEQ_LEN, dtype=torch.bool)
        empty[at] = False
        assert (stored_ids[empty] == -1).all() and (stored[empty] == -math.inf).all()
        assert empty.any() and (~empty).any()
        boundaries += len(student_at)
    assert spanning[0] > 0 and spanning[1] > 0
    assert 0 < manifest.mapped_positions < manifest.signal_positions == manifest.tokens == n * SEQ_LEN
    assert manifest.tokenizers["student"] and manifest.tokenizers["teacher"]


def reference_soft(logits: torch.Tensor, ids: torch.Tensor, logprobs: torch.Tensor, labels: torch.Tensor):
    """T² * forward KL over the K slots and the tail bucket, summed over the positions with a signal and divided
    by the counted positions (float64), as OfflineDistillation's ``soft`` (tail=True) defines it."""
    logits, logprobs = logits.double(), logprobs.double()
    counted = labels != -100
    total = logits.new_zeros(())
    for position in zip(*torch.nonzero(counted & (ids[..., 0] >= 0), as_tuple=True), strict=True):
        slots = ids[position] >= 0
        p = logprobs[position][slots].exp()
        q = torch.softmax(logits[position] / TEMPERATURE, -1)[ids[position][slots]]
        p_tail, q_tail = (1 - p.sum()).clamp(min=0), 1 - q.sum()
        kl = (p * (p.log() - q.log())).sum() + (p_tail * (p_tail.log() - q_tail.log()) if p_tail > 0 else 0)
        total = total + kl
    return TEMPERATURE**2 * total / counted.sum()


def test_offline_distillation_trains_a_student_of_another_tokenizer_on_it(setup, tmp_path):
    cross, teacher = setup
    write(cross, teacher, tmp_path, shard_sequences=8)
    del teacher  # nothing below runs it
    cached = TeacherCacheDataModule(str(tmp_path), batch_size=4, tokenizer=cross.tokenizer.name_or_path)
    assert cached.vocab_size == len(cross.tokenizer)
    torch.manual_seed(0)
    module = OfflineDistillation(
        student=tiny(vocab_size=cached.vocab_size),
        loss=DistillationLoss(temperature=TEMPERATURE, alpha=0.5),
        optimizer=lambda p: torch.optim.Adam(p, lr=3e-3),
        tail=True,
    )
    batch = next(iter(cached.train_dataloader()))
    assert ((batch["teacher_ids"][..., 0] < 0) & (batch["teacher_ids"][..., 0] >= 0).any()).any()  # both kinds
    with torch.no_grad():
        output = module.compute_loss(batch)
        input_ids, attention_mask, labels = module.shifted_inputs(batch)
        logits = module.student(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    expected = reference_soft(logits, batch["teacher_ids"][:, :-1], batch["teacher_logprobs"][:, :-1], labels)
    assert float(expected) > 0.1  # a random student is far from the teacher: the comparison means something
    torch.testing.assert_close(output.soft.double(), expected, rtol=1e-4, atol=1e-6)
    fit = trainer(max_steps=4, limit_val_batches=1, val_check_interval=4)
    fit.fit(module, datamodule=cached)
    assert fit.global_step == 4 and torch.isfinite(fit.callback_metrics["val/loss"])
    with torch.no_grad():
        after = module.compute_loss(batch)
    assert torch.isfinite(after.loss) and after.soft < output.soft  # it learned from the mapped signal


@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_positions_with_empty_slots_count_only_for_the_hard_loss(alpha):
    """tail=True: a position whose slots are all empty adds 0 to the soft loss and gets only the hard
    cross-entropy's gradient, (1 - alpha) (softmax(s) - onehot(label)), from a float64 reference."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 6, 40, generator=gen) * 3).requires_grad_()
    labels = torch.randint(0, 40, (2, 6), generator=gen)
    probs = torch.softmax(torch.randn(2, 6, 40, generator=gen) * 2, -1)
    values, ids = probs.topk(4, -1)
    logprobs = values.log()
    empty = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 1]], dtype=torch.bool)
    ids, logprobs = ids.masked_fill(empty[..., None], -1), logprobs.masked_fill(empty[..., None], -math.inf)
    options = {"tail": True, "temperature": TEMPERATURE, "alpha": alpha, "reduction": "sum", "backend": "torch"}
    out = sparse_distillation_loss(logits, ids, logprobs, labels, **options)
    out.loss.backward()
    # the soft term over the positions with a signal only, in float64
    soft = reference_soft(logits.detach(), ids, logprobs, labels) * labels.numel()
    ce = torch.nn.functional.cross_entropy(logits.detach().double().flatten(0, 1), labels.flatten(), reduction="sum")
    torch.testing.assert_close(out.loss.double(), alpha * soft + (1 - alpha) * ce, rtol=1e-5, atol=1e-5)
    hard_grad = (1 - alpha) * (torch.softmax(logits.detach().double(), -1) - torch.nn.functional.one_hot(labels, 40))
    grad = logits.grad.double()
    if alpha == 1.0:
        assert (logits.grad[empty] == 0).all()  # exactly nothing
    torch.testing.assert_close(grad[empty], hard_grad[empty], rtol=1e-5, atol=1e-7)
    assert (grad[~empty] - hard_grad[~empty]).abs().amax() > 1e-3  # the positions with a signal get more


def test_a_cache_for_another_student_or_a_map_of_other_tokenizers_is_refused(setup, tmp_path):
    cross, teacher = setup
    write(cross, teacher, tmp_path / "cache", shard_sequences=50)
    teacher_dir = tmp_path / "cache" / "teacher_tokenizer"
    with pytest.raises(ValueError, match="holds its teacher's signal in the ids of the student tokenizer") as err:
        TeacherCacheDataModule(str(tmp_path / "cache"), tokenizer=str(teacher_dir))
    assert str(cross.tokenizer.name_or_path).endswith("student")
    assert cross.tokenizer.name_or_path in str(err.value) and str(teacher_dir) in str(err.value)  # names both
    reversed_map = build_vocabulary_map(cross.tokenizer, cross.teacher_tokenizer, cache_dir=cross.cache_dir)
    with pytest.raises(ValueError, match=r"the vocabulary map maps teacher tokenizer .* the data's tokenizers are"):
        write(cross, teacher, tmp_path / "other", vocabulary_map=reversed_map)
    plain = small_text_data(tmp_path, seq_len=SEQ_LEN)  # one tokenizer: no teacher_tokenizer
    signal = TeacherSignal(tiny(vocab_size=plain.vocab_size), k=K)
    with pytest.raises(ValueError, match="got a vocabulary_map, but the data has no teacher_tokenizer"):
        cache_teacher(signal, plain, tmp_path / "plain", vocabulary_map=reversed_map)
    assert not (tmp_path / "other").exists() and not (tmp_path / "plain").exists()
    assert CacheManifest.read(tmp_path / "cache").cross_tokenizer


# ---- a real chat data module across tokenizers

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_messages(i: int) -> list[dict[str, str]]:
    """``chat_conversation(i)`` with answers that the two tokenizers split differently."""
    messages = chat_conversation(i)
    for t, m in enumerate(m for m in messages if m["role"] == "assistant"):
        m["content"] = f"mercy droppeth {i} {t} fine thanks"
    return messages


def text_pieces(tokenizer, ids) -> list[bytes]:
    """Each token's bytes in the rendered text (a special token as its own markup), one decode per token."""
    return [tokenizer.decode([int(i)]).encode() for i in ids]


def span_starts(text: str, marker: str, contents: list[str]) -> list[int]:
    """Byte offsets in ``text`` where each assistant content (after ``marker``) starts, in order."""
    starts, cursor = [], 0
    for content in contents:
        cursor = text.index(marker + content, cursor) + len(marker)
        starts.append(len(text[:cursor].encode()))
    return starts


def test_a_chat_data_module_with_a_teacher_tokenizer_caches_the_binned_signal_at_the_assistant_boundaries(tmp_path):
    """ChatDataModule(tokenizer=student, teacher_tokenizer=teacher): each side renders its own chat template. The
    reference finds the pairs from the two rendered texts alone: a student position whose target is a counted
    (assistant) token carries a signal exactly when the teacher has a token ending at the same byte of that
    assistant turn; there the stored top-k is the teacher's log-softmax (float64, the row alone) binned with
    numpy through the vocabulary map. Every other position's slots are empty."""
    student_dir = save_chat_tokenizers(tmp_path, CHAT_SPECIAL, {"student": CHAT_PLAIN})["student"]
    corpus = ["mercy droppeth fine answer question how are you be nice system user assistant 0 1 2 3 4 5 6 7"] * 8
    bpe = ByteLevelBPETokenizer()  # few merges: "m er c y" for the student is "mer cy", "Ġthanks" is "Ġ t h an k s"
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=2, special_tokens=special, show_progress=False)
    teacher_tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=special[0], pad_token=special[0])
    teacher_tokenizer.chat_template = CHATML
    teacher_tokenizer.save_pretrained(tmp_path / "teacher")
    conversations = [chat_messages(i) for i in range(7)]
    path = write_jsonl(tmp_path / "chats.jsonl", [{"messages": m} for m in conversations])
    data = ChatDataModule(
        path, tokenizer=student_dir, teacher_tokenizer=str(tmp_path / "teacher"), val_fraction=0, batch_size=3,
        cache_dir=str(tmp_path / "hf"),
    )  # fmt: skip
    s_tok, t_tok = data.tokenizer, data.teacher_tokenizer
    teacher = tiny(hidden=32, seed=1, vocab_size=len(t_tok), max_position_embeddings=256).eval()
    signal = TeacherSignal(teacher, k=K, temperature=TEMPERATURE, vocab_size=len(t_tok))
    trainer_ = trainer(use_distributed_sampler=False)
    manifest = cache_teacher(signal, data, tmp_path / "cache", shard_sequences=3, batch_size=2, trainer=trainer_)
    assert manifest.cross_tokenizer and manifest.settings.layout == "rows" and manifest.settings.sequences == 7
    mapping = build_vocabulary_map(t_tok, s_tok).teacher_to_student
    kept = mapping >= 0
    checked, splits = 0, [0, 0]  # teacher tokens ending inside a student token, and the reverse: both occur
    for shard_index in range(manifest.settings.num_shards):
        shard = load_file(tmp_path / "cache" / shard_name(shard_index))
        token_starts = np.cumsum([0, *shard["lengths"].tolist()])
        signal_starts = np.cumsum([0, *shard["signals"].tolist()])
        for row in range(len(shard["lengths"])):
            messages = conversations[shard_index * 3 + row]
            contents = [m["content"] for m in messages if m["role"] == "assistant"]
            s_text = s_tok.apply_chat_template(messages, tokenize=False)
            t_text = t_tok.apply_chat_template(messages, tokenize=False)
            ids = shard["input_ids"][token_starts[row] : token_starts[row + 1]].long()
            counted = shard["counted"][token_starts[row] : token_starts[row + 1]].numpy()
            assert ids.tolist() == s_tok(s_text, add_special_tokens=False).input_ids  # the student's own rendering
            t_ids = t_tok(t_text, add_special_tokens=False).input_ids
            s_pieces, t_pieces = text_pieces(s_tok, ids), text_pieces(t_tok, t_ids)
            assert b"".join(s_pieces) == s_text.encode() and b"".join(t_pieces) == t_text.encode()
            s_end, t_end = np.cumsum([len(p) for p in s_pieces]), np.cumsum([len(p) for p in t_pieces])
            s_starts = span_starts(s_text, "<|assistant|>", contents)
            t_starts = span_starts(t_text, "<|im_start|>assistant\n", contents)
            # counted: the assistant turns' tokens (and the <|end|> closing each), nothing else
            s_begin = s_end - [len(p) for p in s_pieces]
            s_spans = [(a, a + len(c.encode())) for a, c in zip(s_starts, contents, strict=True)]
            t_spans = [(a, a + len(c.encode())) for a, c in zip(t_starts, contents, strict=True)]
            # counted: the assistant turns' tokens and the <|end|> closing each, nothing else
            in_turn = [any(a <= b and e1 <= e for a, e in s_spans) for b, e1 in zip(s_begin, s_end, strict=True)]
            closing = [
                p == b"<|end|>" and any(b == e for _, e in s_spans) for p, b in zip(s_pieces, s_begin, strict=True)
            ]
            np.testing.assert_array_equal(counted, np.array(in_turn) | np.array(closing))
            # the reference pairs: student position p whose target p + 1 is counted, and the teacher's token that
            # ends at the same byte of the same assistant turn (none: p ends inside a teacher token)
            pairs = {}
            for p in np.flatnonzero(counted[1:]).tolist():
                turn = next(j for j, (a, e) in enumerate(s_spans) if a <= s_begin[p + 1] <= e)
                read = int(s_end[p]) - s_spans[turn][0]
                q = np.flatnonzero(t_end == t_spans[turn][0] + read)
                if len(q):
                    pairs[p] = int(q[0])
                else:
                    splits[1] += 1
            inside = {q for q in range(len(t_ids)) if any(a <= t_end[q] < e for a, e in t_spans)}
            splits[0] += len(inside - set(pairs.values()))  # the teacher ends a token inside one of the student's
            # what the cache holds for the row, spread over its positions
            n_signal = signal_starts[row + 1] - signal_starts[row]
            targets = np.flatnonzero(counted[1:])  # positions whose target is counted: the stored ones
            assert n_signal == len(targets)
            stored_ids = torch.full((len(ids), K), -1, dtype=torch.long)
            stored = torch.full((len(ids), K), -math.inf, dtype=torch.float64)
            stored_ids[targets] = shard["teacher_ids"][signal_starts[row] : signal_starts[row + 1]].long()
            stored[targets] = shard["teacher_logprobs"][signal_starts[row] : signal_starts[row + 1]].double()
            with_signal = set(np.flatnonzero((stored_ids >= 0).any(-1).numpy()).tolist())
            assert with_signal == set(pairs), (shard_index, row)
            assert all((stored_ids[p] >= 0).all() for p in pairs)  # the binned top-k fills every slot
            empty = [p for p in range(len(ids)) if p not in pairs]
            assert (stored_ids[empty] == -1).all() and (stored[empty] == -math.inf).all()
            with torch.no_grad():
                logits = teacher(input_ids=torch.tensor([t_ids])).logits[0, :, : len(t_tok)].double()
            probs = torch.softmax(logits, -1).numpy()
            for p, q in pairs.items():
                binned = np.zeros(len(s_tok))
                np.add.at(binned, mapping[kept], probs[q][kept])
                binned = binned ** (1 / TEMPERATURE)  # binned at T=1, tempered in the student's space
                binned /= binned.sum()
                top = np.sort(binned)[::-1][:K]
                # fp16 storage: log-probabilities in [-20, 0] are kept to 2^-6 at worst
                np.testing.assert_allclose(stored[p].numpy(), np.log(top), rtol=0, atol=2**-6)
                held = np.log(binned[stored_ids[p].numpy()])  # each stored id holds its own binned mass
                np.testing.assert_allclose(stored[p].numpy(), held, rtol=0, atol=2**-6)
                checked += 1
    assert checked > 40 and splits[0] > 0 and splits[1] > 0
