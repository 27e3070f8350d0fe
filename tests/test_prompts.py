"""Prompt sets for on-policy distillation: PromptDataModule's rendering, truncation and left padding; generation
from left-padded prompts against each prompt alone; several stop ids; the prompt-only errors; a fit whose
normalization counts exactly the generated tokens; OnPolicyEvaluation on prompt batches.

The rendering oracle is independent of the code under test (as in test_chat_data.py): the template puts a special
token before and after every message, and special tokens split the text before BPE, so a prompt's ids are BOS, then
each message's pieces tokenized alone, then the assistant header (the generation prompt).
"""

import lightning.pytorch as pl
import pytest
import torch
from helpers import (
    CHAT_WORDS,
    VOCAB,
    adam,
    greedy_by_hand,
    make_module,
    save_chat_tokenizers,
    tiny,
    trainer,
    write_jsonl,
)

from lit_distill.callbacks import OnPolicyEvaluation
from lit_distill.data import PromptDataModule
from lit_distill.losses import DistillationLoss
from lit_distill.modules import OnPolicyDistillation
from lit_distill.modules.generation import is_prompt_only

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")

SPECIAL = ["<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|eot|>"]
PLAIN = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
EOT = PLAIN.replace("<|end|>{% endfor %}", "<|eot|>{% endfor %}")  # an end-of-turn token that is not EOS
WORDS = CHAT_WORDS


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Directories of one byte-level BPE that adds BOS on its own (as Llama's does): with the PLAIN template and
    with the EOT one."""
    return save_chat_tokenizers(tmp_path_factory.mktemp("tokenizers"), SPECIAL, {"plain": PLAIN, "eot": EOT})


@pytest.fixture(scope="module")
def tok(tokenizers):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizers["plain"])


def oracle(tok, messages):
    """The prompt ids of ``messages`` under PLAIN with the generation prompt, piece by piece."""
    ids = [tok.bos_token_id]
    for m in messages:
        ids += [
            tok.convert_tokens_to_ids(f"<|{m['role']}|>"),
            *tok(m["content"], add_special_tokens=False)["input_ids"],
        ]
        ids.append(tok.eos_token_id)
    return [*ids, tok.convert_tokens_to_ids("<|assistant|>")]


def question(i, words=3):
    return " ".join(["question", str(i % 10), *WORDS[2 : 2 + words]])


def rows_of(data):
    """The validation batches' rows, each without its left padding."""
    out = []
    for batch in data.val_dataloader():
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            out.append(ids[mask.bool()].tolist())
    return out


def module_of(tmp_path, tokenizers, rows, name="plain", **options):
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)
    options = {"val_fraction": 0.0, "batch_size": 3, "cache_dir": str(tmp_path / "cache"), **options}
    data = PromptDataModule(path, val=path, tokenizer=tokenizers[name], **options)
    data.setup()
    return data


# ----------------------------------------------------------------------------------------------- rendering
def test_string_prompts_are_one_user_turn_rendered_with_the_generation_prompt(tmp_path, tokenizers, tok):
    prompts = [question(i, words=1 + i % 4) for i in range(5)]
    data = module_of(tmp_path, tokenizers, [{"prompt": p} for p in prompts])
    got = rows_of(data)
    assert got == [oracle(tok, [{"role": "user", "content": p}]) for p in prompts]
    assert all(ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id for ids in got)  # one BOS
    assert data.summary["val"] == {"prompts": 5, "rows": 5, "tokens": sum(map(len, got)), "truncated": 0, "dropped": 0}


def test_message_list_prompts_keep_every_turn(tmp_path, tokenizers, tok):
    prompts = [[{"role": "system", "content": "be nice"}, {"role": "user", "content": question(i)}] for i in range(3)]
    data = module_of(tmp_path, tokenizers, [{"prompt": p, "completion": "fine"} for p in prompts])
    assert rows_of(data) == [oracle(tok, p) for p in prompts]  # the completion is not part of a prompt


def test_conversations_drop_their_last_assistant_turn(tmp_path, tokenizers, tok):
    def chat(i):
        return [
            {"role": "user", "content": question(i)},
            {"role": "assistant", "content": "answer fine"},
            {"role": "user", "content": question(i + 1)},
            {"role": "assistant", "content": "answer thanks"},
        ]

    data = module_of(tmp_path, tokenizers, [{"messages": chat(i)} for i in range(4)])
    assert rows_of(data) == [oracle(tok, chat(i)[:3]) for i in range(4)]


def test_prompts_are_left_padded_and_the_masks_mark_every_prompt_token(tmp_path, tokenizers, tok):
    prompts = [question(i, words=1 + 3 * (i % 2)) for i in range(3)]
    data = module_of(tmp_path, tokenizers, [{"prompt": p} for p in prompts])
    batch = next(iter(data.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "prompt_mask"}
    lengths = [len(oracle(tok, [{"role": "user", "content": p}])) for p in prompts]
    width = max(lengths)
    for row, length in enumerate(lengths):
        assert batch["attention_mask"][row].tolist() == [0] * (width - length) + [1] * length
        assert (batch["input_ids"][row, : width - length] == tok.pad_token_id).all()
    assert torch.equal(batch["prompt_mask"], batch["attention_mask"].bool()) and is_prompt_only(batch)
    assert data.vocab_size == len(tok) and data.special_tokens["eos_token_id"] == tok.eos_token_id


def test_long_prompts_keep_their_end(tmp_path, tokenizers, tok):
    prompts = [question(i, words=6) for i in range(3)]
    data = module_of(tmp_path, tokenizers, [{"prompt": p} for p in prompts], max_prompt_length=5)
    full = [oracle(tok, [{"role": "user", "content": p}]) for p in prompts]
    assert rows_of(data) == [ids[-5:] for ids in full]  # the generation prompt survives the cut
    assert data.summary["val"]["truncated"] == 3 and data.summary["val"]["tokens"] == 15


def test_drop_counts_the_prompts_it_drops_and_refuses_to_drop_them_all(tmp_path, tokenizers, tok):
    prompts = [question(0, words=1), question(1, words=6), question(2, words=1)]
    limit = len(oracle(tok, [{"role": "user", "content": prompts[0]}]))
    data = module_of(tmp_path, tokenizers, [{"prompt": p} for p in prompts], max_prompt_length=limit, truncation="drop")
    assert data.summary["val"]["dropped"] == 1 and data.summary["val"]["rows"] == 2
    assert rows_of(data) == [oracle(tok, [{"role": "user", "content": p}]) for p in (prompts[0], prompts[2])]
    with pytest.raises(
        ValueError,
        match=r"every one of the 3 train prompts is longer than max_prompt_length=2 tokens and was dropped \(truncation"
        r"='drop'\); raise max_prompt_length or use truncation='keep_end'",
    ):
        module_of(tmp_path, tokenizers, [{"prompt": p} for p in prompts], max_prompt_length=2, truncation="drop")


def test_stop_token_ids_are_eos_and_the_templates_end_of_turn(tmp_path, tokenizers, tok):
    rows = [{"prompt": question(0)}]
    assert module_of(tmp_path, tokenizers, rows).stop_token_ids == [tok.eos_token_id]  # PLAIN ends turns with EOS
    eot = module_of(tmp_path, tokenizers, rows, name="eot")
    assert eot.stop_token_ids == [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot|>")]


def test_bad_prompt_data_is_refused(tmp_path, tokenizers):
    with pytest.raises(ValueError, match=r".*prompts\.jsonl is plain text \('text'\); a prompt set needs 'prompt'"):
        module_of(tmp_path, tokenizers, [{"text": "hello"}])
    with pytest.raises(
        ValueError, match=r"row 0 of .* leaves an empty prompt \(nothing before its last assistant turn\)"
    ):
        module_of(tmp_path, tokenizers, [{"messages": [{"role": "assistant", "content": "hi"}]}])
    with pytest.raises(ValueError, match="truncation must be one of \\('keep_end', 'drop'\\), got 'keep_start'"):
        PromptDataModule("x.jsonl", tokenizer=tokenizers["plain"], truncation="keep_start")


# ---------------------------------------------------------------------------------------------- generation
def left_padded(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
    return {"input_ids": ids, "attention_mask": mask, "prompt_mask": mask.bool()}


def prompts_of(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen) for n in lengths]


def test_left_padded_prompts_continue_as_each_prompt_alone():
    module = make_module("on-policy", max_new_tokens=5)
    module.student.generation_config.eos_token_id = None  # no early stop: every row gets all its tokens
    prompts = prompts_of([3, 8, 5], seed=1)  # prompts whose greedy replies change when padding is attended to
    out = module.generate(left_padded(prompts))
    for row, prompt in enumerate(prompts):
        n = len(prompt)
        expected = greedy_by_hand(module.student, prompt, 5)
        assert torch.equal(out["input_ids"][row, :n], prompt)  # the prompt, moved to the start of the row
        assert torch.equal(out["input_ids"][row, n : n + 5], expected)
        assert out["labels"][row].tolist() == [-100] * n + expected.tolist() + [-100] * (8 - n)
        assert out["attention_mask"][row].tolist() == [1] * (n + 5) + [0] * (8 - n)


def test_several_stop_ids_stop_each_row_at_the_first_and_nothing_after_counts():
    module = make_module("on-policy", max_new_tokens=6)
    module.student.generation_config.eos_token_id = None
    prompts = prompts_of([4, 6, 5], seed=3)
    batch = left_padded(prompts)
    free = [greedy_by_hand(module.student, p, 6).tolist() for p in prompts]
    stops = [free[0][1], free[1][3]]  # row 0 stops by its 2nd token, row 1 by its 4th (or earlier)
    module.stop_token_ids = stops
    out = module.generate(batch)
    counted = (out["labels"] != -100).sum(1).tolist()
    for row, (prompt, tokens) in enumerate(zip(prompts, free, strict=True)):
        first = next((i for i, t in enumerate(tokens) if t in stops), None)
        kept = tokens if first is None else tokens[: first + 1]  # the stop token itself counts
        n = len(prompt)
        assert counted[row] == len(kept) and out["labels"][row, n : n + len(kept)].tolist() == kept
        assert out["attention_mask"][row, n + len(kept) :].sum() == 0
    assert counted[0] <= 2 and counted[1] <= 4
    assert module.stop_ids() == stops


def test_pad_equal_to_eos_counts_up_to_the_first_eos():
    module = make_module("on-policy", max_new_tokens=6)
    module.student.generation_config.pad_token_id = 2  # the EOS id: padding looks like a stop token
    prompts = prompts_of([2, 6, 4], seed=9)  # row 1 ends at its third token, the others run on
    out = module.generate(left_padded(prompts, pad=2))
    for row, prompt in enumerate(prompts):
        tokens, n = greedy_by_hand(module.student, prompt, 6).tolist(), len(prompt)
        kept = tokens[: tokens.index(2) + 1] if 2 in tokens else tokens
        assert out["input_ids"][row, :n].tolist() == prompt.tolist()
        assert out["labels"][row, n:].tolist() == kept + [-100] * (out["labels"].shape[1] - n - len(kept))
    assert (out["labels"] == 2).sum() >= 1  # some row did end at EOS


def test_stop_ids_default_to_every_eos_id_of_the_generation_config():
    module = make_module("on-policy")
    module.student.generation_config.eos_token_id = [2, 7]
    module.special_tokens = {"eos_token_id": 9}
    assert module.stop_ids() == [2, 7, 9]


@pytest.mark.parametrize("options", [{"lmbda": 0.5}, {"lmbda": 0.0}, {"mix": "both"}])
def test_prompt_only_batches_must_all_be_on_policy(options):
    module = make_module("on-policy", **options)
    with pytest.raises(
        ValueError,
        match="prompt-only batches have no completion to distill on off-policy, so every batch is on-policy: got"
        r" lmbda=.*, mix=.*; use lmbda=1 and mix='either' \(or ChatDataModule data\)",
    ):
        module.compute_loss(left_padded(prompts_of([3, 5])))


# ---------------------------------------------------------------------------------------------------- a fit
class Counts(pl.Callback):
    """The normalizer's counted tokens of each optimizer step (read before the module's hook resets them)."""

    def __init__(self):
        self.tokens = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.tokens.append(int(pl_module.normalizer._tokens))


def test_a_fit_on_prompts_counts_exactly_the_generated_tokens(tmp_path, tokenizers):
    prompts = [{"prompt": question(i, words=1 + i % 5)} for i in range(8)]
    path = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    data = PromptDataModule(path, val=path, tokenizer=tokenizers["plain"], batch_size=4, cache_dir=str(tmp_path))
    config = {"vocab_size": data.vocab_size, "max_position_embeddings": 64, **data.special_tokens}
    # Frequent stops besides EOS, so that rows end early: the count must stop at each row's first one.
    stops = [*data.stop_token_ids, *range(100, 180)]
    module = OnPolicyDistillation(
        tiny(seed=0, **config), tiny(hidden=48, seed=1, **config), DistillationLoss(divergence="reverse_kl"),
        optimizer=adam, max_new_tokens=8, stop_token_ids=stops, seed=3,
    )  # fmt: skip
    generated = []
    original = module.student.generate

    def recording(**kwargs):
        sequences = original(**kwargs)
        generated.append(sequences[:, kwargs["input_ids"].shape[1] :].tolist())  # the new tokens of each row
        return sequences

    module.student.generate = recording
    counts, evaluation = Counts(), OnPolicyEvaluation(max_new_tokens=4, max_batches=1)
    pl.seed_everything(0)
    t = trainer(max_steps=2, callbacks=[counts, evaluation], val_check_interval=2, limit_val_batches=1)
    t.fit(module, data)

    def kept(tokens):
        first = next((i for i, token in enumerate(tokens) if token in stops), None)
        return len(tokens) if first is None else first + 1  # the stop token counts, nothing after it

    expected = [sum(kept(row) for row in rows) for rows in generated[:2]]
    assert counts.tokens == expected
    assert min(kept(row) for rows in generated[:2] for row in rows) < 8  # some row did stop early
    assert len(generated) == 3  # two training batches, one validation batch of OnPolicyEvaluation
    for name in ("val/loss", "val/teacher_nll_of_student", "val/student_reverse_kl"):
        assert torch.isfinite(t.callback_metrics[name]), name
