"""``lit-distill demo --chat``: chat distillation end to end on dialogues from the bundled plays, offline.

1. Reuses (or trains) the main demo's tokenizer and teacher, and writes conversations from the plays
   (``lit_distill.data.dialogues``: a speaker's reply to the speeches before it) into the cache, rendered by the
   bundled chat template (plain-text role headers, turns ending with EOS: no token added, so the tokenizer and
   the teacher's vocabulary are the main demo's).
2. Fine-tunes that teacher on the training conversations' assistant turns (cached beside it).
3. Trains three same-size students from one initialization on the same conversations (``chat_students.py``):
   SFT on the assistant turns alone, soft-label on the assistant turns, and on-policy (the soft-label loss, plus
   the teacher's distribution on the student's own replies to the conversations' prompts).
4. Prints a table like the main demo's (validation loss on held-out assistant tokens, the teacher's NLL of
   each model's replies to held-out prompts and the reverse KL there, tokens/s, the share of the training time
   spent waiting for data) and writes it (``results.md``, ``results.json``) and the plot to ``--out``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path

from .chat_students import (
    CHAT,
    CHAT_TECHNIQUES,
    TokenCount,
    assistant_loss,
    reply_scores,
    train_chat_student,
    wait_of,
)
from .report import WaitRow, report

#: sizes of the chat run. ``seq_len``: tokens of a conversation at most (the base teacher's length; longer ones
#: lose the end of the reply); ``reply_tokens``: what a reply to a held-out prompt (and an on-policy reply) may
#: hold; ``prompts``: held-out prompts whose replies are scored; ``max_chars``: the dialogues' turn length;
#: ``train_conversations``/``val_conversations``: the dialogues kept (None: all), as many as the run reads.
CHAT_PRESETS = {
    "default": {
        "seq_len": 128,
        "batch_size": 16,
        "student_hidden": 96,
        "student_layers": 2,
        "student_steps": 250,
        "val_every": 125,
        "finetune_steps": 150,
        "reply_tokens": 32,
        "prompts": 256,
        "max_chars": 200,
        "train_conversations": 8000,
        "val_conversations": None,
    },
    # seconds: a smoke test (and the tests' size)
    "quick": {
        "seq_len": 96,
        "batch_size": 8,
        "student_hidden": 32,
        "student_layers": 1,
        "student_steps": 8,
        "val_every": 4,
        "finetune_steps": 8,
        "reply_tokens": 8,
        "prompts": 16,
        "max_chars": 80,
        "train_conversations": 160,
        "val_conversations": 48,
    },
}
#: the command line's sizes that shape the chat students; the others shape the teacher it starts from
STUDENT_KEYS = ("batch_size", "student_hidden", "student_layers", "student_steps", "val_every")
TEACHER_KEYS = ("vocab_size", "seq_len", "teacher_hidden", "teacher_layers", "teacher_steps")
#: the fine-tuning of the teacher on the conversations: a tenth of its pretraining rate, warmup and cosine decay
FINETUNE_LR = 3e-4


def chat_main(ns, base_sizes: dict) -> list[WaitRow]:
    """Run the chat demo with the parsed options of ``lit-distill demo`` (``--chat``) from the teacher of the main
    demo's ``base_sizes`` (its preset); its rows of the table."""
    from .start import start, text_data
    from .training import cached_teacher, sizes_of

    base = sizes_of(ns, base_sizes, TEACHER_KEYS)  # the main demo's sizes: its cached teacher
    sizes = sizes_of(ns, CHAT_PRESETS["quick" if ns.quick else "default"], STUDENT_KEYS)
    cache, out = start(ns, "lit-distill demo --chat", sizes)
    text = text_data(base, cache)
    base_teacher, _ = cached_teacher(text, base, ns, cache, out)
    chat, prompts = chat_data(text.tokenizer, sizes, cache)
    counts, held_out = chat.describe(), prompts.describe()["val"]["prompts"]
    print(
        f"dialogues: {counts['train']['rows']:,} conversations for training ({counts['train']['counted tokens']:,}"
        f" assistant tokens), {counts['val']['rows']:,} held out ({counts['val']['counted tokens']:,});"
        f" {min(sizes['prompts'], held_out)} held-out prompts scored"
    )
    teacher, teacher_row = chat_teacher(base_teacher, chat, prompts, sizes, ns, cache, out)
    rows, curves = [teacher_row], {}
    for technique in CHAT_TECHNIQUES:
        row, curve = train_chat_student(technique, teacher, chat, prompts, sizes, ns, out)
        rows.append(row)
        curves[technique] = curve
    truncated = counts["train"]["truncated"] / max(1, counts["train"]["rows"])
    notes = [
        f"dialogues: turns of at most {sizes['max_chars']} characters, conversations of at most {sizes['seq_len']}"
        f" tokens ({truncated:.0%} of the training ones cut at the end)"
    ]
    report(rows, curves, sizes, out, quick=ns.quick, notes=notes, layout=CHAT)
    return rows


def chat_data(tokenizer, sizes: dict, cache: Path):
    """``(ChatDataModule, PromptDataModule)`` of the dialogues written under ``cache`` (once): the conversations
    with loss on the assistant turns, and the held-out conversations' prompts, through the bundled template."""
    from ..data import ChatDataModule, PromptDataModule

    directory = write_chat_dialogues(tokenizer, sizes, cache)
    common = {"tokenizer": str(directory / "tokenizer"), "chat_template": "bundled", "cache_dir": str(cache)}
    val = str(directory / "val.jsonl")
    chat = ChatDataModule(
        str(directory / "train.jsonl"), val, max_seq_length=sizes["seq_len"], loss_on="assistant",
        batch_size=sizes["batch_size"], **common,
    )  # fmt: skip
    # the held-out prompts (PromptDataModule reads each conversation without its reply), kept whole to fit a reply
    prompts = PromptDataModule(val, val, max_prompt_length=sizes["seq_len"] - sizes["reply_tokens"], **common)
    if len(chat.tokenizer) != len(tokenizer):  # the bundled template adds no token: the main demo's ids
        raise RuntimeError(
            f"the chat data's tokenizer has {len(chat.tokenizer)} tokens, the teacher's {len(tokenizer)}"
        )
    return chat, prompts


def write_chat_dialogues(tokenizer, sizes: dict, cache: Path) -> Path:
    """The directory of ``train.jsonl``, ``val.jsonl`` (``write_dialogues``'s, the first ``*_conversations`` of
    each) and ``tokenizer/`` (a copy of ``tokenizer``), written once under ``cache`` and then reused as they are
    (the tokenized rows are cached by the files' fingerprint)."""
    from ..data import dialogues

    keep = {name: sizes[f"{name}_conversations"] for name in ("train", "val")}
    vocabulary = hashlib.sha1(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    code = hashlib.sha1(Path(dialogues.__file__).read_bytes()).hexdigest()  # a new parser writes them again
    key = hashlib.sha1(json.dumps([sizes["max_chars"], keep, vocabulary, code]).encode()).hexdigest()[:12]
    directory = cache / "demo" / f"dialogues-{key}"
    if not (directory / "tokenizer" / "tokenizer.json").exists():
        dialogues.write_dialogues(directory, max_chars=sizes["max_chars"])
        for name, rows in keep.items():
            if rows is not None:
                path = directory / f"{name}.jsonl"
                lines = path.read_text(encoding="utf-8").splitlines(keepends=True)[:rows]
                path.write_text("".join(lines), encoding="utf-8")
        tokenizer.save_pretrained(directory / "tokenizer")  # last: the directory is whole when it is there
    return directory


def chat_teacher(base, chat, prompts, sizes: dict, ns, cache: Path, out: Path):
    """The teacher fine-tuned on the training conversations' assistant turns, from the cache (beside the base
    teacher, keyed by it and the data) or trained and cached; in eval mode, with its row of the table."""
    import lightning.pytorch as pl
    from transformers import AutoModelForCausalLM

    from ..modules import LanguageModelTraining
    from .training import _optimizer, _trainer, _warmup_cosine, student_seed

    steps = sizes["finetune_steps"]
    shape = {k: sizes[k] for k in ("seq_len", "batch_size", "finetune_steps", "max_chars", "train_conversations")}
    key = hashlib.sha1(json.dumps([base.name_or_path, shape, ns.seed, FINETUNE_LR]).encode()).hexdigest()[:12]
    directory = cache / "demo" / f"chat-teacher-{key}"
    start = time.perf_counter()
    tokens_per_sec = wait = math.nan
    if (directory / "config.json").exists() and not ns.retrain_teacher:
        print(f"chat teacher: reusing {directory}")
        model = AutoModelForCausalLM.from_pretrained(directory)
    else:
        print(f"chat teacher: fine-tuning {base.name_or_path} {steps} steps (cached afterwards in {directory})")
        pl.seed_everything(ns.seed, verbose=False)
        tuned = copy.deepcopy(base).train()  # the base teacher stays as it is (and named by its directory)
        module = LanguageModelTraining(tuned, optimizer=_optimizer(FINETUNE_LR), lr_scheduler=_warmup_cosine(steps))
        counter = TokenCount()
        trainer = _trainer(steps, sizes, out, "chat-teacher", [counter])
        trainer.fit(module, chat)
        module.save_student(str(directory))
        model = module.student
        tokens_per_sec, wait = counter.tokens / (time.perf_counter() - start), wait_of(trainer)
    model.eval()
    model.name_or_path = str(directory)
    ce, model.val_argmax = assistant_loss(model, chat)  # the students' agreement compares with it
    wall = time.perf_counter() - start
    nll, reverse_kl = reply_scores(model, model, prompts, sizes, student_seed(ns))  # its own replies: KL 0
    row = WaitRow("teacher", ce, math.exp(ce), math.nan, tokens_per_sec, wall, nll, reverse_kl, data_wait_fraction=wait)
    return model, row
