"""Conversations from the bundled plays (``lit_distill/data/dialogues.py``) and the bundled chat template.

The parse is checked against a hand-written play snippet in three heading styles the bundled texts use, with the
speeches written out independently below; the split against ``TextDataModule``'s held-out works; the template
against a byte-level BPE trained on a small sample of the corpus (the demo's kind of tokenizer)."""

import json

import pytest

from lit_distill.data import BUNDLED_CHAT_TEMPLATE, ChatDataModule, PromptDataModule, read_documents, split_documents
from lit_distill.data.chat_template import _render, resolve_template
from lit_distill.data.dialogues import main, parse_scenes, play_conversations, play_title, write_dialogues
from lit_distill.data.tokenizers import load_tokenizer, train_bpe

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

SNIPPET = """\
and so kneel down before you; but, indeed, to pray for the queen.THE TRAGEDY OF SOME PLAY, PART II

by William Shakespeare

PERSONS REPRESENTED.

HAMLET, Prince of Denmark.
Horatio, his friend.

ACT I.

SCENE I. Elsinore. A platform.

[Enter HAMLET and Horatio.]

HAMLET.
Who's there?

Hor.
Friends to this ground.
[Aside.] And liegemen
to the Dane.

[Exit Horatio.]

HAMLET.
Alone at last.

Lady Capulet.
A crutch, a crutch!

SCENE II. Another room.

FIRST CITIZEN
Before we proceed any further, hear me speak.
Enter a Messenger
[Exeunt.]

ALL.
Speak, speak.
"""
SCENES = [  # written out by hand, independently of the parser
    [
        ("HAMLET", "Who's there?"),
        ("Hor", "Friends to this ground.\nAnd liegemen\nto the Dane."),
        ("HAMLET", "Alone at last."),
        ("Lady Capulet", "A crutch, a crutch!"),
    ],
    [
        ("FIRST CITIZEN", "Before we proceed any further, hear me speak."),
        ("ALL", "Speak, speak."),
    ],
]


def test_speakers_and_speeches_are_parsed_exactly():
    assert parse_scenes(SNIPPET) == SCENES
    assert play_title(SNIPPET) == "The Tragedy of Some Play, Part II"  # without the previous work's last words


def test_a_poem_gives_no_speeches():
    assert parse_scenes("SONNETS\n\nby William Shakespeare\n\nI.\n\nFrom fairest creatures we desire increase,\n") == []


def test_conversations_name_the_speaker_and_play_and_hold_the_preceding_speeches():
    conversations = play_conversations([SNIPPET], context_speeches=2)
    system = "You are {} in The Tragedy of Some Play, Part II."
    expected = [
        (system.format("Hor"), "HAMLET: Who's there?", SCENES[0][1][1]),
        (
            system.format("HAMLET"),
            "HAMLET: Who's there?\n\nHor: Friends to this ground.\nAnd liegemen\nto the Dane.",
            "Alone at last.",
        ),
        (
            system.format("Lady Capulet"),
            "Hor: Friends to this ground.\nAnd liegemen\nto the Dane.\n\nHAMLET: Alone at last.",
            "A crutch, a crutch!",
        ),
        (system.format("ALL"), "FIRST CITIZEN: Before we proceed any further, hear me speak.", "Speak, speak."),
    ]  # a scene's first speech answers nothing, and no context crosses a scene
    assert [[m["role"] for m in c["messages"]] for c in conversations] == [["system", "user", "assistant"]] * 4
    assert [tuple(m["content"] for m in c["messages"]) for c in conversations] == expected


def test_max_chars_keeps_the_latest_context_and_the_start_of_a_reply():
    (first, second, third, fourth) = play_conversations([SNIPPET], context_speeches=2, max_chars=30)
    assert second["messages"][1]["content"] == "Hor: And liegemen\nto the Dane."  # the speech's end, whole lines
    assert first["messages"][2]["content"] == "Friends to this ground."  # the reply's start
    assert fourth["messages"][1]["content"] == "FIRST CITIZEN: hear me speak."  # one long line: cut at a space
    for conversation in (first, second, third, fourth):
        assert all(len(m["content"]) <= 30 for m in conversation["messages"][1:])
    with pytest.raises(ValueError, match="context_speeches"):
        play_conversations([SNIPPET], context_speeches=0)


def plays(rows):
    return {row["messages"][0]["content"].split(" in ", 1)[1] for row in rows}


def test_write_dialogues_splits_by_whole_works_as_the_text_data_module(tmp_path, capsys):
    counts = main([str(tmp_path / "a")])
    assert f"{counts['train']:,} training and {counts['val']:,} validation conversations" in capsys.readouterr().out
    rows = {
        name: [json.loads(line) for line in (tmp_path / "a" / f"{name}.jsonl").read_text().splitlines()]
        for name in ("train", "val")
    }
    assert {name: len(r) for name, r in rows.items()} == counts
    assert counts["train"] > 20_000 and counts["val"] > 1_000
    assert not plays(rows["train"]) & plays(rows["val"])
    held_out = split_documents(read_documents(), 0.05)[1]  # TextDataModule's default validation works
    assert plays(rows["val"]) == {play_title(work) + "." for work in held_out}
    assert len(plays(rows["train"])) == 42 - 2 - 5  # the five poems give no conversation
    write_dialogues(tmp_path / "b")
    for name in ("train.jsonl", "val.jsonl"):  # deterministic
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not list(tmp_path.glob("*/*.partial"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level BPE as the demo trains, on a small sample of the corpus (EOS doubles as BOS, as there)."""
    cache = tmp_path_factory.mktemp("bpe")
    train_bpe([work[:20_000] for work in read_documents()[:6]], 600, cache)
    return load_tokenizer(str(next((cache / "tokenizers").iterdir())))  # as the data modules load it


def test_the_bundled_template_keeps_the_prefix_property_and_ends_replies_with_eos(tokenizer):
    template = resolve_template(tokenizer, "bundled")
    assert template == BUNDLED_CHAT_TEMPLATE.read_text()
    size = len(tokenizer)
    messages = play_conversations([SNIPPET])[1]["messages"] + [
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Nothing more."},
    ]
    full = tokenizer(_render(tokenizer, template, messages, False), add_special_tokens=False)["input_ids"]
    assert full[0] == tokenizer.bos_token_id and full.count(tokenizer.bos_token_id) == 1 + len(messages)  # EOS=BOS
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer(_render(tokenizer, template, messages[:i], True), add_special_tokens=False)["input_ids"]
        after = tokenizer(_render(tokenizer, template, messages[: i + 1], False), add_special_tokens=False)
        after = after["input_ids"]
        assert full[: len(before)] == before and full[: len(after)] == after  # growing prefixes, on token ids
        reply = after[len(before) :]
        assert reply[-1] == tokenizer.eos_token_id and tokenizer.decode(reply[:-1]) == message["content"]
    assert len(tokenizer) == size  # no token added: the main demo's tokenizer stays as it is


def test_chat_and_prompt_data_from_the_dialogues_learn_the_replies_and_stop_at_eos(tokenizer, tmp_path):
    rows = play_conversations([SNIPPET])
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    chat = ChatDataModule(
        str(path), str(path), tokenizer=tokenizer.name_or_path, chat_template="bundled", max_seq_length=256,
        batch_size=4, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    counts = chat.describe()["train"]
    assert counts["rows"] == len(rows) and counts["merged boundaries"] == 0 and counts["truncated"] == 0
    batch = next(iter(chat.val_dataloader()))
    for i, row in enumerate(rows):
        learned = batch["input_ids"][i][batch["labels"][i] != -100].tolist()
        assert learned[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(learned[:-1]) == row["messages"][2]["content"]
    prompts = PromptDataModule(
        str(path), tokenizer=tokenizer.name_or_path, chat_template="bundled", val_fraction=0, batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    assert chat.stop_token_ids == prompts.stop_token_ids == [tokenizer.eos_token_id]
    prompt = next(iter(prompts.train_dataloader()))
    assert tokenizer.decode(prompt["input_ids"][0]).endswith("<|endoftext|>\nassistant:\n")
