"""ChatDataModule: the formats, loss_on, both kinds of chat template, truncation, the map cache, the held-out split,
resume, bad input, and a distillation step that counts exactly the assistant tokens.

The oracle is independent of the code under test: the templates below put a special token before and after every
message, and special tokens split the text before BPE, so a conversation's ids are the concatenation of each
message's pieces tokenized alone, and the learned tokens are those of the assistant pieces (:func:`oracle`).
"""

import copy
import itertools
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    CHAT_MARKED as MARKED,
)
from helpers import (
    CHAT_PLAIN as PLAIN,
)
from helpers import (
    CHAT_SPECIAL as SPECIAL,
)
from helpers import (
    CHAT_WORDS,
    InterruptAt,
    adam,
    assert_soft_label_fits,
    loader,
    save_chat_tokenizers,
    tiny,
    trainer,
    write_jsonl,
)
from helpers import (
    chat_conversation as conversation,
)
from lightning.pytorch.callbacks import Callback

from lit_distill import distillation_loss
from lit_distill.callbacks import CheckpointOnInterrupt
from lit_distill.data import ChatDataModule, chat
from lit_distill.data.chat import PadCollate
from lit_distill.data.chat_formats import Conversation
from lit_distill.data.chat_template import encode
from lit_distill.losses import DistillationLoss
from lit_distill.modules import LanguageModelTraining, SoftLabelDistillation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

# Plain text headers: the generation prompt ends in a space that BPE merges with the answer's first word.
SPACED = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
SPACED_MARKED = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}assistant: {% generation %}{{ m['content'] }}\n"
    "{% endgeneration %}{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# No user header and a space after every turn: the space ending an answer merges with the next question too.
RUN_ON = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}assistant: {{ m['content'] }} {% else %}{{ m['content'] }}"
    " {% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)
RUN_ON_MARKED = RUN_ON.replace(
    "assistant: {{ m['content'] }} ", "assistant: {% generation %}{{ m['content'] }} {% endgeneration %}"
)
WORDS = CHAT_WORDS


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Directories of one byte-level BPE that adds BOS on its own (as Llama's does): with the PLAIN template, the
    MARKED one, and none."""
    return save_chat_tokenizers(
        tmp_path_factory.mktemp("tokenizers"), SPECIAL, {"plain": PLAIN, "marked": MARKED, "bare": None}
    )


@pytest.fixture(scope="module")
def tok(tokenizers):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizers["plain"])


def oracle(tok, messages, loss_on="assistant"):
    """(ids, labels) of ``messages`` under PLAIN or MARKED, built piece by piece (see the module docstring)."""
    ids, labels = [tok.bos_token_id], [tok.bos_token_id if loss_on == "all" else -100]
    last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
    for j, m in enumerate(messages):
        head = tok.convert_tokens_to_ids(f"<|{m['role']}|>")
        body = [*tok(m["content"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
        learned = loss_on == "all" or (m["role"] == "assistant" and (loss_on == "assistant" or j == last))
        ids += [head, *body]
        labels += [head if loss_on == "all" else -100, *(body if learned else [-100] * len(body))]
    return ids, labels


def rows_of(dataset):
    return [(list(map(int, r["input_ids"])), list(map(int, r["labels"]))) for r in dataset]


def make(tmp_path, train, tokenizer, **kwargs):
    kwargs = {"val_fraction": 0.0, "batch_size": 2, "cache_dir": str(tmp_path / "cache"), **kwargs}
    data = ChatDataModule(train, tokenizer=tokenizer, **kwargs)
    data.setup()
    return data


# ------------------------------------------------------------------------------------------------ formats
def in_format(fmt, messages):
    if fmt == "messages":
        return {"messages": messages}
    if fmt == "conversations":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in messages]}
    if fmt == "prompt-completion-lists":
        return {"prompt": messages[:-1], "completion": messages[-1:]}
    return {"prompt": messages[-2]["content"], "completion": messages[-1]["content"]}  # strings


@pytest.mark.parametrize("fmt", ["messages", "conversations", "prompt-completion-lists", "prompt-completion-strings"])
def test_each_format_learns_the_assistant_tokens(tmp_path, tokenizers, tok, fmt):
    chats = [conversation(i, turns=1 + i % 2) for i in range(4)]
    if fmt == "prompt-completion-strings":
        chats = [m[-2:] for m in chats]
    data = make(tmp_path, write_jsonl(tmp_path / "c.jsonl", [in_format(fmt, m) for m in chats]), tokenizers["plain"])
    assert rows_of(data.train_set) == [oracle(tok, m) for m in chats]
    _, labels = rows_of(data.train_set)[1]
    answers = ["answer 1 1"] if fmt == "prompt-completion-strings" else ["answer 1 0", "answer 1 1"]
    assert tok.decode([t for t in labels if t != -100]) == "".join(f"{a} fine thanks<|end|>" for a in answers)


def test_text_format_counts_every_token_and_ends_with_eos(tmp_path, tokenizers, tok):
    texts = ["the quick brown fox", "hello how are you"]
    data = make(tmp_path, write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts]), tokenizers["bare"])
    expected = [[*tok(t)["input_ids"], tok.eos_token_id] for t in texts]  # the tokenizer's own BOS, once
    assert rows_of(data.train_set) == [(ids, ids) for ids in expected]
    assert tok.decode(expected[0]) == "<|bos|>the quick brown fox<|end|>"


@pytest.mark.parametrize("loss_on", ["assistant", "last_assistant", "all"])
@pytest.mark.parametrize("template", ["plain", "marked"])
def test_loss_on_with_and_without_generation_markers(tmp_path, tokenizers, tok, loss_on, template):
    chats = [conversation(i, turns=3) for i in range(3)]
    chats[1].insert(3, {"role": "tool", "content": "two plus two is four"})
    data = make(tmp_path, write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats]), tokenizers[template],
                loss_on=loss_on)  # fmt: skip
    assert rows_of(data.train_set) == [oracle(tok, m, loss_on) for m in chats]


def test_loss_on_completion_learns_only_the_completion(tmp_path, tokenizers, tok):
    chats = [conversation(i, turns=2) for i in range(3)]
    path = write_jsonl(tmp_path / "c.jsonl", [in_format("prompt-completion-lists", m) for m in chats])
    data = make(tmp_path, path, tokenizers["marked"], loss_on="completion")
    assert rows_of(data.train_set) == [oracle(tok, m, "last_assistant") for m in chats]
    with pytest.raises(ValueError, match="loss_on='completion' needs prompt/completion data; row 0 of"):
        make(tmp_path, write_jsonl(tmp_path / "m.jsonl", [{"messages": chats[0]}]), tokenizers["plain"],
             loss_on="completion")  # fmt: skip


@pytest.mark.parametrize(
    ("plain", "marked", "merges", "learned"),
    [
        (SPACED, SPACED_MARKED, {"assistant": 2, "last_assistant": 1},
         {"assistant": " answer 7 0 fine thanks\n answer 7 1 fine thanks\n",
          "last_assistant": " answer 7 1 fine thanks\n"}),
        (RUN_ON, RUN_ON_MARKED, {"assistant": 3, "last_assistant": 1},
         {"assistant": " answer 7 0 fine thanks question answer 7 1 fine thanks ",
          "last_assistant": " answer 7 1 fine thanks "}),
    ],
    ids=["merge-at-the-start", "merges-at-both-ends"],
)  # fmt: skip
def test_marker_and_prefix_spans_agree_when_bpe_merges_across_a_boundary(tok, plain, marked, merges, learned):
    """The generation prompt ends in a space: tokenized alone it is not a token prefix of the conversation (and
    with RUN_ON neither is an answer's end). Both paths give the span the token across the boundary (" answer",
    and RUN_ON's next " question"); the prefix path counts the merges."""
    chat_ = Conversation(conversation(7, turns=2))
    text = tok.apply_chat_template(chat_.messages, chat_template=plain, tokenize=False)
    prompt = tok(text[: text.index("answer 7 0")], add_special_tokens=False)["input_ids"]
    assert tok(text, add_special_tokens=False)["input_ids"][: len(prompt)] != prompt, "the test needs a merge there"
    for loss_on in ("assistant", "last_assistant"):
        prefix_ids, prefix_counted, merged = encode(tok, plain, chat_, loss_on, 0, "x")
        marker_ids, marker_counted, _ = encode(tok, marked, chat_, loss_on, 0, "x")
        assert (prefix_ids, prefix_counted) == (marker_ids, marker_counted)
        assert merged == merges[loss_on]
        assert tok.decode([t for t, c in zip(prefix_ids, prefix_counted, strict=True) if c]) == learned[loss_on]


def test_the_summary_counts_merged_boundaries(tmp_path, tokenizers):
    (tmp_path / "spaced.jinja").write_text(SPACED)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation(i, turns=2)} for i in range(3)])
    data = make(tmp_path, path, tokenizers["plain"], chat_template=str(tmp_path / "spaced.jinja"))
    assert data.summary["train"]["merged boundaries"] == 3 * 2  # each answer's start


def test_a_chat_template_file_overrides_the_tokenizers(tmp_path, tokenizers, tok):
    (tmp_path / "t.jinja").write_text(MARKED.replace("<|end|>", "<|end|><|pad|>"))
    chats = [conversation(i) for i in range(2)]
    data = make(tmp_path, write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats]), tokenizers["bare"],
                chat_template=str(tmp_path / "t.jinja"))  # fmt: skip
    ids, labels = rows_of(data.train_set)[0]
    assert tok.decode(ids) == tok.apply_chat_template(chats[0], chat_template=PLAIN, tokenize=False).replace(
        "<|end|>", "<|end|><|pad|>"
    )
    learned = tok.decode([t for t in labels if t != -100])  # the file's markers hold <|pad|> too
    assert learned == "answer 0 0 fine thanks<|end|><|pad|>answer 0 1 fine thanks<|end|><|pad|>"
    inline = make(tmp_path, data.train, tokenizers["bare"], chat_template=(tmp_path / "t.jinja").read_text())
    assert rows_of(inline.train_set) == rows_of(data.train_set)  # the template's text itself works too
    with pytest.raises(FileNotFoundError, match=r"chat_template 'no\.jinja' is not a file"):
        make(tmp_path, data.train, tokenizers["bare"], chat_template="no.jinja")


def test_bos_is_never_doubled(tmp_path, tokenizers, tok):
    rendered = tok.apply_chat_template(conversation(0), tokenize=False)
    assert tok(rendered)["input_ids"][:2] == [tok.bos_token_id] * 2, "the trap: tokenizing with special tokens"
    data = make(tmp_path, write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation(0)}]), tokenizers["plain"])
    ids, _ = rows_of(data.train_set)[0]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1


# ---------------------------------------------------------------------------------------------- truncation
def truncation_data(tmp_path, tok):
    """Three conversations: short (fits), long (cut inside its second answer), and one whose long system turn
    leaves no answer before the cut; max_seq_length between them."""
    chats = [conversation(0, turns=1), conversation(1, turns=3), conversation(2, turns=1, system="be nice " * 12)]
    full = [oracle(tok, m) for m in chats]
    learned = [i for i, label in enumerate(full[1][1]) if label != -100]
    second_answer = next(j for i, j in itertools.pairwise(learned) if j > i + 1)  # after the first gap
    limit = learned[learned.index(second_answer) + 1] + 1  # cut after two tokens of the second answer
    assert len(full[0][0]) <= limit < len(full[1][0]) and full[1][1][limit] != -100
    assert all(label == -100 for label in full[2][1][:limit]) and len(full[2][0]) > limit
    return write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats]), full, limit


def test_keep_start_cuts_and_drops_a_row_left_with_nothing_to_learn(tmp_path, tokenizers, tok, caplog):
    path, full, limit = truncation_data(tmp_path, tok)
    with caplog.at_level(logging.INFO):
        data = make(tmp_path, path, tokenizers["plain"], max_seq_length=limit)
    cut = [(ids[:limit], labels[:limit]) for ids, labels in full[:2]]
    assert rows_of(data.train_set) == cut
    learned = sum(sum(label != -100 for label in labels[1:]) for _, labels in cut)
    counts = {"conversations": 3, "rows": 2, "tokens": len(full[0][0]) + limit, "counted tokens": learned,
              "truncated": 1, "dropped": 1, "merged boundaries": 0}  # fmt: skip
    assert data.summary == {"train": counts}
    assert [m for m in caplog.messages if m.startswith("chat data")] == [
        f"chat data, train: 3 conversations, 2 rows, {counts['tokens']} tokens, {learned} counted tokens, 1 truncated,"
        " 1 dropped, 0 merged boundaries"
    ]


def test_drop_drops_longer_rows(tmp_path, tokenizers, tok):
    path, full, limit = truncation_data(tmp_path, tok)
    data = make(tmp_path, path, tokenizers["plain"], max_seq_length=limit, truncation="drop")
    assert rows_of(data.train_set) == [full[0]]
    assert data.summary["train"]["dropped"] == 2 and data.summary["train"]["truncated"] == 0


def test_every_row_dropped_is_an_error(tmp_path, tokenizers, tok):
    path, _, _ = truncation_data(tmp_path, tok)
    with pytest.raises(
        ValueError,
        match=r"every one of the 3 train conversations was dropped \(truncation='drop', max_seq_length=8: 3 longer,"
        r" 0 with no token to learn left\); raise max_seq_length",
    ):
        make(tmp_path, path, tokenizers["plain"], max_seq_length=8, truncation="drop")
    with pytest.raises(ValueError, match=r"\(truncation='keep_start', max_seq_length=8: 3 longer, 3 with no token"):
        make(tmp_path, path, tokenizers["plain"], max_seq_length=8)


# ---------------------------------------------------------------------------------------------- bad input
MESSAGES = conversation(0)
BAD_ROWS = {
    "fields": [{"id": 1, "instruction": "hi"}],
    "role": [{"messages": MESSAGES}, {"messages": [MESSAGES[0], {"role": "bot", "content": "hi"}]}],
    "no assistant": [{"messages": MESSAGES[:2]}],
    "completion": [{"messages": MESSAGES}],
}


@pytest.mark.parametrize(
    ("rows", "options", "message"),
    [
        ("fields", {}, r".*bad\.jsonl is in no chat data format I know: found the fields \['id', 'instruction'\]"),
        ("role", {}, r"row 1 of .*bad\.jsonl: message 1 has the role 'bot'; the roles accepted are 'system', 'user',"
                     r" 'assistant', 'tool'"),
        ("no assistant", {}, r"conversation 0 of .*bad\.jsonl has no assistant turn, so loss_on='assistant' counts"
                             r" none of its tokens; drop it, or use loss_on='all'"),
        ("completion", {"loss_on": "completion"}, r"loss_on='completion' needs prompt/completion data; row 0 of"
                                                  r" .*bad\.jsonl is a conversation"),
        ("role", {"tokenizer": "bare"}, r"the tokenizer .*bare has no chat template and no chat_template was given:"
                                        r" pass chat_template= a Jinja file"),
        ("role", {"chat_template": "count.jinja"}, r"conversation 0 of .*bad\.jsonl: the chat template does not render"
         r" growing prefixes \(messages\[:2\] with the generation prompt is not the start of messages\[:3\]\)"),
    ],
)  # fmt: skip
def test_bad_input_is_one_message_naming_the_row(tmp_path, tokenizers, rows, options, message):
    (tmp_path / "count.jinja").write_text("turns={{ messages | length }}" + PLAIN)  # a render that changes its start
    if "chat_template" in options:
        options = {**options, "chat_template": str(tmp_path / options["chat_template"])}
    tokenizer = tokenizers[options.pop("tokenizer", "plain")]
    with pytest.raises(ValueError, match=message):
        make(tmp_path, write_jsonl(tmp_path / "bad.jsonl", BAD_ROWS[rows]), tokenizer, **options)


def test_a_missing_file_or_tokenizer(tmp_path, tokenizers):
    with pytest.raises(FileNotFoundError, match=r"chat data file missing\.jsonl does not exist"):
        make(tmp_path, "missing.jsonl", tokenizers["plain"])
    with pytest.raises(ValueError, match=r"ChatDataModule needs tokenizer= \(a name or directory\)"):
        ChatDataModule(str(tmp_path / "c.jsonl"))


def test_a_hub_name_while_offline_says_it_is_offline(tmp_path, tokenizers, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ConnectionError,
        match=r"'someone/chats' is not a local file or directory, and the Hugging Face Hub is offline \(HF_HUB_OFFLINE"
        r" is set\) with no copy of it in the cache",
    ):
        make(tmp_path, "someone/chats", tokenizers["plain"])

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/chats' on the Hub")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(ConnectionError, match="could not reach the Hugging Face Hub for the dataset 'someone/chats'"):
        make(tmp_path, "someone/chats", tokenizers["plain"])


# --------------------------------------------------------------------------------------- sources and cache
def test_parquet_csv_and_saved_datasets_read_as_jsonl(tmp_path, tokenizers, tok):
    import datasets

    chats = [conversation(i) for i in range(3)]
    expected = [oracle(tok, m) for m in chats]
    table = datasets.Dataset.from_list([{"messages": m} for m in chats])
    table.to_parquet(tmp_path / "c.parquet")
    table.save_to_disk(tmp_path / "saved")
    datasets.DatasetDict({"train": table, "validation": table.select([2])}).save_to_disk(tmp_path / "dict")
    for source in ("c.parquet", "saved", "dict"):
        assert rows_of(make(tmp_path, str(tmp_path / source), tokenizers["plain"]).train_set) == expected, source
    both = make(tmp_path, str(tmp_path / "dict"), tokenizers["plain"], val=str(tmp_path / "dict"))
    assert rows_of(both.train_set) == expected and rows_of(both.val_set) == expected[2:]
    with pytest.raises(ValueError, match=r"dict holds the splits \['train', 'validation'\], not split='test'"):
        make(tmp_path, str(tmp_path / "dict"), tokenizers["plain"], split="test")
    datasets.Dataset.from_list([in_format("strings", m[-2:]) for m in chats]).to_csv(tmp_path / "c.csv")
    pairs = make(tmp_path, str(tmp_path / "c.csv"), tokenizers["plain"]).train_set
    assert rows_of(pairs) == [oracle(tok, m[-2:]) for m in chats]


def test_a_second_setup_reads_the_map_cache_and_a_new_template_does_not(tmp_path, tokenizers, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation(i)} for i in range(5)])
    real, calls = chat.encode, []
    monkeypatch.setattr(chat, "encode", lambda *args: calls.append(args[3]) or real(*args))
    first = make(tmp_path, path, tokenizers["plain"])
    assert len(calls) == 5
    again = make(tmp_path, path, tokenizers["plain"])
    assert len(calls) == 5 and rows_of(again.train_set) == rows_of(first.train_set)
    (tmp_path / "t.jinja").write_text(PLAIN.replace("<|end|>", "<|end|><|pad|>"))
    other = make(tmp_path, path, tokenizers["plain"], chat_template=str(tmp_path / "t.jinja"))
    assert len(calls) == 10 and len(rows_of(other.train_set)[0][0]) == len(rows_of(first.train_set)[0][0]) + 5
    make(tmp_path, path, tokenizers["plain"], max_seq_length=30)  # another cut: another cache
    assert len(calls) == 15 and len(list((tmp_path / "cache" / "chat").glob("*.arrow"))) == 3


def test_validation_holds_out_whole_conversations_seeded(tmp_path, tokenizers, tok):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation(i)} for i in range(20)])

    def split(seed):
        data = make(tmp_path, path, tokenizers["plain"], val_fraction=0.25, seed=seed)
        ids = [{int(re.search(r"question (\d+) ", tok.decode(r[0])).group(1)) for r in rows_of(s)}
               for s in (data.train_set, data.val_set)]  # fmt: skip
        assert data.summary["train"]["rows"] == 15 and data.summary["val"]["rows"] == 5
        return ids

    train, val = split(0)
    assert len(train) == 15 and len(val) == 5 and not train & val and train | val == set(range(20))
    assert split(0) == [train, val] and split(1)[1] != val


# ------------------------------------------------------------------------------------------ batches, loaders
def test_batches_are_right_padded_with_masks(tmp_path, tokenizers, tok):
    chats = [conversation(0, turns=1), conversation(1, turns=2)]
    data = make(tmp_path, write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats]), tokenizers["plain"])
    batch = next(iter(data.val_dataloader() or torch.utils.data.DataLoader(data.train_set, 2, collate_fn=data.collate)))
    (short, short_labels), (long, long_labels) = (oracle(tok, m) for m in chats)
    pad = len(long) - len(short)
    assert batch["input_ids"].tolist() == [short + [tok.pad_token_id] * pad, long]
    assert batch["labels"].tolist() == [short_labels + [-100] * pad, long_labels]
    assert batch["attention_mask"].tolist() == [[1] * len(short) + [0] * pad, [1] * len(long)]
    first = [labels.index(next(t for t in labels if t != -100)) for labels in (short_labels, long_labels)]
    assert batch["prompt_mask"].tolist() == [[i < first[r] for i in range(len(long))] for r in range(2)]
    assert batch["prompt_mask"].dtype == torch.bool and first[0] == len(tok.apply_chat_template(
        chats[0][:2], add_generation_prompt=True, tokenize=True, return_dict=False))  # fmt: skip
    collate = __import__("pickle").loads(__import__("pickle").dumps(data.collate))  # workers get a copy
    assert isinstance(collate, PadCollate) and collate.pad_id == tok.pad_token_id


@pytest.mark.slow
def test_import_leaves_datasets_out():
    code = "import sys, lit_distill, lit_distill.data, lit_distill.modules; sys.exit('datasets' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, f"importing lit_distill imported datasets: {proc.stderr}"


class SeenBatches(Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.global_step, batch["input_ids"].tolist()))


def test_ctrl_c_and_resume_see_the_batches_of_the_uninterrupted_run(tmp_path, tokenizers):
    """6 batches per epoch, 8 steps, interrupted at step 3 (mid-epoch): the same batches in the same order."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation(i, turns=1)} for i in range(12)])

    def run(callbacks, ckpt_path=None):
        data = ChatDataModule(path, tokenizer=tokenizers["plain"], batch_size=2, val_fraction=0.0,
                              cache_dir=str(tmp_path / "cache"), num_workers=1)  # fmt: skip
        pl.seed_everything(0)
        module = LanguageModelTraining(student=tiny(vocab_size=data.vocab_size), optimizer=adam)
        t = pl.Trainer(max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False,
                       limit_val_batches=0, default_root_dir=tmp_path, callbacks=callbacks)  # fmt: skip
        t.fit(module, datamodule=data, ckpt_path=ckpt_path)
        return module

    full = SeenBatches()
    uninterrupted = run([full])
    first, second = SeenBatches(), SeenBatches()
    with pytest.raises(SystemExit):
        run([first, CheckpointOnInterrupt(dirpath=str(tmp_path)), InterruptAt(3)])
    resumed = run([second], ckpt_path=tmp_path / "interrupted.ckpt")
    assert first.seen[-1][0] == 3 and first.seen + second.seen == full.seen
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


# ------------------------------------------------------------------------------------ through the modules
def test_a_distillation_step_is_normalized_by_the_assistant_tokens_alone(tmp_path, tokenizers, tok):
    """One SGD step on a chat batch moves the student by the gradient of the token mean over exactly the
    assistant tokens, computed here row by row without padding from the oracle's labels."""
    chats = [conversation(0, turns=1), conversation(1, turns=2), conversation(2, turns=3)]
    data = make(tmp_path, write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats]), tokenizers["plain"],
                batch_size=3)  # fmt: skip
    batch = data.collate(list(data.train_set))
    loss = DistillationLoss(temperature=2.0, alpha=0.7)

    def module():
        pl.seed_everything(0)
        student, teacher = tiny(vocab_size=data.vocab_size), tiny(hidden=48, seed=1, vocab_size=data.vocab_size)
        sgd = lambda p: torch.optim.SGD(p, lr=1.0)  # noqa: E731
        return SoftLabelDistillation(student=student, teacher=teacher, loss=copy.deepcopy(loss), optimizer=sgd)

    stepped = module()
    before = copy.deepcopy(stepped.student.state_dict())
    answers = [m["content"] for c in chats for m in c if m["role"] == "assistant"]
    expected = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)  # + <|end|>
    assert stepped.distill(batch).num_tokens.item() == expected
    trainer(max_steps=1).fit(stepped, loader(batch))
    reference = module()
    total, tokens = 0.0, 0
    for messages in chats:
        ids, labels = (torch.tensor([x]) for x in oracle(tok, messages))
        s, t = reference.student(input_ids=ids).logits[:, :-1], reference.teacher(input_ids=ids).logits[:, :-1]
        out = distillation_loss(s, t, labels[:, 1:], temperature=2.0, alpha=0.7, reduction="sum")
        total, tokens = total + out.loss, tokens + int(out.num_tokens)
    (total / tokens).backward()
    for name, p in reference.student.named_parameters():
        torch.testing.assert_close(before[name] - stepped.student.state_dict()[name], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("technique", ["hard-argmax", "hard-generate", "co", "on-policy"])
def test_every_technique_learns_only_the_assistant_tokens_of_chat_batches(tmp_path, tokenizers, tok, technique):
    """Hard-label (teacher argmax; generated replies), co-distillation and on-policy on a chat batch: the off-policy
    ones count exactly the assistant tokens; the generating ones continue each row's prompt (the tokens before its
    first assistant token) and count only what they generate. One step of each changes the student."""
    from lit_distill.modules import CoDistillation, HardLabelDistillation, OnPolicyDistillation

    chats = [conversation(0, turns=1), conversation(1, turns=2), conversation(2, turns=1)]
    data = make(tmp_path, write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats]), tokenizers["plain"],
                batch_size=3)  # fmt: skip
    batch = data.collate(list(data.train_set))
    pl.seed_everything(0)
    common = {
        "student": tiny(vocab_size=data.vocab_size, max_position_embeddings=128),
        "teacher": tiny(hidden=48, seed=1, vocab_size=data.vocab_size, max_position_embeddings=128),
        "loss": DistillationLoss(temperature=2.0, alpha=0.7),
        "optimizer": adam,
    }
    generate = {"max_new_tokens": 5, "do_sample": False}
    module = {
        "hard-argmax": lambda: HardLabelDistillation(**common),
        "hard-generate": lambda: HardLabelDistillation(**common, mode="generate", **generate),
        "co": lambda: CoDistillation(**common, teacher_ce_weight=0.5),
        "on-policy": lambda: OnPolicyDistillation(**common, lmbda=1.0, **generate),
    }[technique]()
    with torch.no_grad():
        counted = int(module.compute_loss(batch).num_tokens)
    answers = [m["content"] for c in chats for m in c if m["role"] == "assistant"]
    assistant = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers)  # + <|end|>
    if technique in ("hard-argmax", "co"):
        assert counted == assistant
    else:  # replies of at most 5 tokens to the 3 prompts, which end at each conversation's first <|assistant|>
        assert 3 <= counted <= 3 * 5
        first = batch["prompt_mask"].sum(1) - 1
        assert (batch["input_ids"][torch.arange(3), first] == tok.convert_tokens_to_ids("<|assistant|>")).all()
    before = copy.deepcopy(module.student.state_dict())
    trainer(max_steps=1).fit(module, loader(batch))
    assert any(not torch.equal(before[k], v) for k, v in module.student.state_dict().items())


def test_soft_label_distillation_fits_on_a_chat_jsonl(tmp_path, tokenizers):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation(i)} for i in range(16)])
    data = ChatDataModule(path, tokenizer=tokenizers["marked"], batch_size=4, val_fraction=0.25, num_proc=2,
                          cache_dir=str(tmp_path / "cache"))  # fmt: skip
    assert_soft_label_fits(data)
    assert data.summary["train"]["rows"] == 12 and data.summary["val"]["rows"] == 4


def test_the_command_line_tokenizes_chat_data_with_the_teachers_tokenizer(tmp_path, tokenizers, tok, monkeypatch):
    """Without data.tokenizer, a teacher saved with its tokenizer (and chat template) renders the conversations."""
    from lit_distill.cli.lightning_cli import run_cli

    teacher_dir = tmp_path / "teacher"
    tiny(hidden=48, seed=1, vocab_size=len(tok)).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    train = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(i)} for i in range(8)])
    student = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    cli = run_cli(
        ["fit", "--model", "lit_distill.modules.SoftLabelDistillation",
         "--model.init_args.student", "lit_distill.models.CausalLM",
         "--model.init_args.student.init_args.config", json.dumps(student),
         "--model.init_args.teacher", "lit_distill.models.CausalLM",
         "--model.init_args.teacher.init_args.name_or_path", str(teacher_dir),
         "--data", "lit_distill.data.ChatDataModule", "--data.init_args.train", train,
         "--data.init_args.val_fraction", "0.25", "--data.init_args.batch_size", "2",
         "--data.init_args.cache_dir", str(tmp_path / "cache"),
         "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
         "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"]
    )  # fmt: skip
    assert cli.datamodule.tokenizer.get_vocab() == tok.get_vocab()
    assert cli.datamodule.tokenizer.chat_template == tok.chat_template
    assert cli.trainer.global_step == 1


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is missing")
def test_two_processes_read_distinct_rows_and_step_as_one_on_their_learned_tokens(tmp_path, tokenizers):
    """DDP on two CPU processes (tests/chat_ddp_worker.py): each process trains on its own rows, together every
    training row once in the epoch, with equal batch counts; the first step equals one process's step on both
    first batches, normalized by the learned tokens of both."""
    train = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation(i, turns=1 + i % 3)} for i in range(12)])
    out = tmp_path / "ddp.pt"
    worker = [sys.executable, "chat_ddp_worker.py", train, tokenizers["plain"], str(tmp_path / "cache"), str(out)]
    proc = subprocess.run(worker, capture_output=True, text=True, timeout=600, cwd=str(Path(__file__).parent))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(out, weights_only=False)
    seen = result["seen"]
    assert [len(batches) for batches in seen] == [3, 3]  # 12 rows, 2 per batch on each of 2 processes
    key = lambda row: (tuple(row["input_ids"]), tuple(row["labels"]))  # noqa: E731
    per_process = [sorted(key(row) for batch in batches for row in batch) for batches in seen]
    assert not set(per_process[0]) & set(per_process[1])
    assert sorted(per_process[0] + per_process[1]) == sorted(key(row) for row in result["train_rows"])
    assert result["counted"] == sum(
        sum(label != -100 for label in row["labels"][1:]) for batches in seen for row in batches[0]
    )  # fmt: skip
    for name, expected in result["expected"].items():
        torch.testing.assert_close(result["after_first"][name], expected, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(result["after_first"][k], result["before"][k]) for k in result["before"])
