"""What several test files and the multi-process workers share, so that no test file imports another.

- tiny random Llamas, their token batches, a quiet CPU trainer, and a module of each technique built on them;
- the per-dtype tolerances and the gradient comparison the kernel tests use against ``tests/oracle.py``;
- ``InterruptAt``, a Ctrl-C sent at a chosen batch;
- ``permuted_tokenizer``, a saved tokenizer with two ids swapped (the same size, not the same tokenizer);
- for the DDP, FSDP and DeepSpeed workers: each process's rows of a global batch, and a fit, an export check
  and a resume on a given strategy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from lit_distill.losses import DistillationLoss
from lit_distill.models import CausalLM
from lit_distill.modules import (
    CoDistillation,
    HardLabelDistillation,
    OfflineDistillation,
    OnPolicyDistillation,
    SoftLabelDistillation,
)

# ------------------------------------------------------------------------------------------ tiny models
VOCAB = 96
TINY = {
    "model_type": "llama",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
KINDS = ["soft", "hard-argmax", "hard-generate", "co", "on-policy"]


def tiny(hidden=32, seed=0, **extra):
    """A seeded random Llama of ``TINY``'s shape; ``extra`` overrides config entries."""
    torch.manual_seed(seed)
    return CausalLM(config={**TINY, "hidden_size": hidden, **extra}).build()


def make_batch(rows=4, length=12, seed=0, padding=()):
    """Token batch; ``padding`` lists (row, count) of right-padding positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    mask = torch.ones_like(ids)
    for row, count in padding:
        ids[row, length - count :] = 0
        mask[row, length - count :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def with_teacher_signal(batch, slots=8, temperature=2.0):
    """``batch`` with the top-``slots`` signal of ``make_module``'s teacher, as a teacher cache holds it."""
    from lit_distill.data.teacher_cache import sparse_signal

    with torch.no_grad():
        logits = tiny(hidden=48, seed=1).eval()(input_ids=batch["input_ids"]).logits
    ids, logprobs = sparse_signal(logits, method="topk", k=slots, temperature=temperature)
    return {**batch, "teacher_ids": ids, "teacher_logprobs": logprobs}


def loader(*batches):
    return DataLoader(list(batches), batch_size=None)


def trainer(**kwargs):
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**defaults, **kwargs})


def adam(params):
    return torch.optim.Adam(params, lr=1e-2)


def make_module(kind, **kwargs):
    """A module of technique ``kind`` (one of ``KINDS``): student of width 32, teacher of width 48."""
    student, teacher = tiny(hidden=32, seed=0), tiny(hidden=48, seed=1)
    common = {
        "student": student,
        "teacher": teacher,
        "loss": kwargs.pop("loss", DistillationLoss(temperature=2.0, alpha=0.7)),
        "optimizer": adam,
    }
    if kind == "soft":
        return SoftLabelDistillation(**common, **kwargs)
    if kind == "hard-argmax":
        return HardLabelDistillation(**common, **kwargs)
    if kind == "hard-generate":
        generate = {"mode": "generate", "prompt_length": 4, "max_new_tokens": 6, "do_sample": False}
        return HardLabelDistillation(**common, **generate, **kwargs)
    if kind == "co":
        return CoDistillation(**common, teacher_ce_weight=0.5, **kwargs)
    if kind.startswith("on-policy"):  # greedy, so that one process and two continue the same prompts the same way
        on_policy = {"prompt_length": 4, "max_new_tokens": 6, "do_sample": False}
        if kind == "on-policy-sampled":  # the sampled-token estimator (reverse KL), not in KINDS
            on_policy["estimator"] = "sampled_token"
            common["loss"] = kwargs.pop("loss", DistillationLoss(divergence="reverse_kl"))
        elif kind != "on-policy":
            raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
        return OnPolicyDistillation(**common, **{**on_policy, **kwargs})
    if kind == "offline":  # the teacher's signal comes with the batch (with_teacher_signal)
        del common["teacher"]
        return OfflineDistillation(**common, **kwargs)
    raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")


# ------------------------------------------------------------------------------- kernels vs the oracle
# dtype: (loss rtol, gradient rtol); gradients are stored in the input dtype, so they round to it.
TOLERANCES = {
    torch.float32: (2e-5, 1e-4),
    torch.bfloat16: (2e-5, 1.6e-2),
    torch.float16: (2e-5, 2e-3),
}


def assert_grad_close(actual, expected, rtol, what="gradient", atol=0.0):
    """``actual`` within ``rtol`` of the float64 ``expected``, entry by entry, with a floor of ``rtol / 10`` of
    the largest entry (plus ``atol``); an all-zero or None ``expected`` needs an all-zero or None ``actual``."""
    if expected is None or not bool((expected != 0).any()):
        assert actual is None or bool((actual == 0).all()), f"{what}: expected zero/None"
        return
    assert actual is not None, f"{what}: missing"
    actual = actual.detach().cpu().double()
    assert not torch.isnan(actual).any(), f"{what} has NaN"
    # Elementwise relative error with a floor at a fraction of the largest entry (tiny entries round freely).
    floor = rtol * 0.1 * expected.abs().max() + atol
    err = (actual - expected).abs()
    bound = rtol * expected.abs() + floor
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"{what}: max excess at {worst.item()}: got {actual.flatten()[worst]:.6g}, want {expected.flatten()[worst]:.6g}"
    )


# ---------------------------------------------------------------------------------------------- Ctrl-C
class InterruptAt(Callback):
    """Sends this process SIGINT (as Ctrl-C does) at the start of one batch (None: the step's first)."""

    def __init__(self, step: int, batch_idx: int | None = None):
        self.step, self.batch_idx = step, batch_idx
        self.sent = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.batch_idx in (None, batch_idx) and not self.sent:
            self.sent = True
            signal.raise_signal(signal.SIGINT)  # to this (the main) thread, at once: no other thread takes it


class StopAt(Callback):
    """Ends training after optimizer step ``step``, through Lightning's ``should_stop``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


# ------------------------------------------------------------------------------- multi-process workers
def finish_worker() -> None:
    """End a worker process whose work succeeded (its results are saved): close the process group, then exit
    without the interpreter's teardown. That teardown can still abort a finished Gloo process (SIGABRT,
    "terminate called without an active exception"; seen in CI after an FSDP1 resume that had passed), which
    would fail a test for a reason outside what it checks."""
    from lit_distill.sharding import close_process_group

    close_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Rows(Dataset):
    """This process's rows of the global batch: process r of W gets rows r, r + W, ... (no sampler involved)."""

    def __init__(self, batch, devices):
        self.batch = batch
        self.devices = devices

    def __len__(self):
        return self.batch["input_ids"].shape[0] // self.devices

    def __getitem__(self, i):
        rank = torch.distributed.get_rank() if self.devices > 1 else 0
        return {k: v[i * self.devices + rank] for k, v in self.batch.items()}


class GradientCount(Callback):
    """How many student and teacher parameters have a gradient when the optimizer is about to step, and how
    many optimizer steps this run took."""

    steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1
        self.counts = {
            name: sum(p.grad is not None for p in getattr(pl_module, name).parameters())
            for name in ("student", "teacher")
        }


def build(technique: str, dtype: str = ""):
    """``make_module(technique)`` seeded, with SGD with momentum; ``dtype="bf16"`` puts the teacher in bfloat16."""
    pl.seed_everything(0)
    module = make_module(technique)
    if dtype == "bf16":
        module.teacher.to(torch.bfloat16)
    # Momentum's first step equals plain SGD's, and it leaves a state entry for every parameter it steps.
    module.optimizer = lambda params: torch.optim.SGD(params, lr=1.0, momentum=0.9)
    return module


def fit(module, kind: str, steps: int, ckpt_path=None, callbacks=(), strategy="auto", batch=None, **kwargs):
    """Train ``steps`` optimizer steps on ``batch`` (default: 4 unevenly padded rows), 4 rows a micro-batch, on
    one process (``kind="single"``) or two under ``strategy``."""
    devices = 1 if kind == "single" else 2
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_steps=steps,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=list(callbacks),
        **kwargs,
    )
    if batch is None:  # rows 0 and 2 (rank 0) are heavily padded, rows 1 and 3 (rank 1) not at all
        batch = make_batch(rows=4, length=12, seed=5, padding=[(0, 8), (2, 6)])
    rows = DataLoader(Rows(batch, devices), batch_size=4 // devices, shuffle=False)
    trainer.fit(module, rows, rows if kwargs.get("limit_val_batches") else None, ckpt_path=ckpt_path)
    return trainer


def accumulation_batch() -> dict[str, torch.Tensor]:
    """8 rows: the even ones (rank 0) padded, the odd ones (rank 1) not at all."""
    return make_batch(rows=8, length=12, seed=5, padding=[(0, 8), (2, 6), (4, 3), (6, 9)])


def export_diff(exported: dict[str, str], full: dict[str, dict]) -> float:
    """The largest difference between the weights reloaded from the exported directories and ``full``."""
    from transformers import AutoModelForCausalLM

    diff = 0.0
    for name, directory in exported.items():
        state = AutoModelForCausalLM.from_pretrained(directory).state_dict()
        assert state.keys() == full[name].keys(), (name, state.keys() ^ full[name].keys())
        diff = max(diff, *(float((v - full[name][k].to(v.dtype)).abs().max()) for k, v in state.items()))
    return diff


def resume(technique: str, kind: str, out: str, strategy) -> None:
    """2 steps in one run, and 1 step + checkpoint + 1 resumed step, in one process group; ``strategy(kind)``
    builds each run's strategy. Rank 0 saves both runs' final weights to ``out``."""
    from lit_distill.sharding import full_state_dict

    module = build(technique)
    fit(module, kind, 2, strategy=strategy(kind))
    uninterrupted = {name: full_state_dict(module, name) for name in ("student", "teacher")}
    directory = f"{out}.checkpoints"
    checkpoint = ModelCheckpoint(dirpath=directory, filename="mid")
    fit(build(technique), kind, 1, callbacks=[checkpoint], strategy=strategy(kind))
    module = build(technique)
    trainer = fit(
        module,
        kind,
        2,
        ckpt_path=f"{directory}/mid.ckpt",
        callbacks=[gradients := GradientCount()],
        strategy=strategy(kind),
    )
    resumed = {name: full_state_dict(module, name) for name in ("student", "teacher")}
    if trainer.global_rank == 0:
        result = {"uninterrupted": uninterrupted, "resumed": resumed, "steps_run": gradients.steps}
        torch.save(result, out)


# ------------------------------------------------------------------------------------------ tokenizers
def small_text_data(root: Path, seq_len: int = 16, batch_size: int = 4):
    """A ``TextDataModule`` over eight short works written to ``root`` (a BPE of 300 tokens, cached there)."""
    from lit_distill.data import TextDataModule

    words = "the quality of mercy is not strained it droppeth as the gentle rain from heaven upon the place beneath"
    with open(root / "works.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"text": f"Work {i}. " + " ".join(words.split()[i:] + words.split()[:i]) * 6}) + "\n")
    data = TextDataModule(
        files=[str(root / "works.jsonl")], vocab_size=300, seq_len=seq_len, batch_size=batch_size,
        val_fraction=0.25, cache_dir=str(root / "cache"),
    )  # fmt: skip
    data.setup()
    return data


def permuted_tokenizer(source: Path, target: Path) -> Path:
    """A copy of the tokenizer saved in ``source`` with two ordinary tokens' ids swapped: the same size and
    tokens, other ids (what a BPE trained on other text looks like to the models)."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "config.json"))
    spec = json.loads((target / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first = min(300, len(vocab) - 2)  # an ordinary token, also in small vocabularies
    a, b = sorted(vocab, key=vocab.get)[first : first + 2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (target / "tokenizer.json").write_text(json.dumps(spec))
    return target


#: the words of the tiny chat tests' conversations, and so of their tokenizer's training text
CHAT_WORDS = ["question", "answer", "hello", "how", "are", "you", "fine", "thanks", "what", "is", "two", "plus", "four",
              "be", "nice", "the", "quick", "brown", "fox"]  # fmt: skip


def save_chat_tokenizers(root, special: list[str], templates: dict, adds_bos: bool = True) -> dict[str, str]:
    """One tiny byte-level BPE (360 tokens, trained on CHAT_WORDS; ``special`` first, ``<|bos|>`` at id 0)
    saved once per ``templates`` entry (name -> chat template or None) under ``root``; returns name -> directory.
    With ``adds_bos`` it adds BOS when tokenizing with special tokens, as Llama's does."""
    from tokenizers import ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    text = [" ".join(CHAT_WORDS[i:] + CHAT_WORDS[:i]) + " 0 1 2 3 4 5 6 7 8 9" for i in range(len(CHAT_WORDS))]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text * 4, vocab_size=360, min_frequency=2, special_tokens=special, show_progress=False)
    if adds_bos:
        bpe.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|end|>", pad_token="<|pad|>"
    )
    dirs = {}
    for name, template in templates.items():
        tokenizer.chat_template = template
        tokenizer.save_pretrained(Path(root) / name)
        dirs[name] = str(Path(root) / name)
    return dirs


def write_jsonl(path, rows) -> str:
    """``rows`` (dicts) as a jsonl file at ``path``; returns its path as a string."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def greedy_by_hand(model, prompt, steps):
    """Greedy continuation of one unpadded prompt, a full forward pass per token (no cache, no generate)."""
    ids = prompt.unsqueeze(0)
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], 1)
    return ids[0, len(prompt) :]


def assert_soft_label_fits(data) -> None:
    """Two soft-label steps on ``data`` (a data module) move the student and validate to a finite loss."""
    import copy

    from lit_distill.modules import SoftLabelDistillation

    pl.seed_everything(0)
    student, teacher = tiny(vocab_size=data.vocab_size), tiny(hidden=48, seed=1, vocab_size=data.vocab_size)
    module = SoftLabelDistillation(student=student, teacher=teacher, optimizer=adam)
    before = copy.deepcopy(module.student.state_dict())
    fit = trainer(max_steps=2, limit_val_batches=1, val_check_interval=2)
    fit.fit(module, datamodule=data)
    assert fit.global_step == 2 and torch.isfinite(fit.callback_metrics["val/loss"])
    assert any(not torch.equal(before[k], v) for k, v in module.student.state_dict().items())


# Chat test material shared by test_chat_data.py and test_prepared_chat.py: special tokens, two templates
# (PLAIN renders, MARKED has {% generation %} markers) and a conversation of `turns` exchanges.
CHAT_SPECIAL = ["<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>"]
CHAT_PLAIN = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT_MARKED = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
    "{{ m['content'] }}<|end|>{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chat_conversation(i, turns=2, system="be nice"):
    messages = [{"role": "system", "content": system}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"question {i} {t} how are you"})
        messages.append({"role": "assistant", "content": f"answer {i} {t} fine thanks"})
    return messages


class RecordInputIds(Callback):
    """Every training batch's ``input_ids``, as lists (the DDP workers gather them from every process)."""

    def __init__(self) -> None:
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch["input_ids"].tolist())


def ddp_trainer(callbacks: list) -> pl.Trainer:
    """The DDP workers' trainer: two CPU processes on gloo, one epoch, no validation, logging or checkpoints."""
    return pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip


# ------------------------------------------------------------------------------ cross-tokenizer batches
def cross_tokenizer_text_batch(rows, student_tokenizer, teacher_tokenizer) -> dict[str, torch.Tensor]:
    """The cross-tokenizer batch of issue 26's spec for text rows (``{"input_ids"}`` items of one length), built
    by hand: the teacher's ids are its tokenizer's encoding of each run of the student's text, a student special
    token (EOS between documents) becomes the teacher's EOS; the boundary pairs are ``align()``'s groups whose
    student target token exists. No ``student_chunk`` / ``teacher_chunk`` (a cache reads only the boundaries)."""
    from lit_distill.data.cross_tokenizer import align, token_bytes

    s_table, t_table = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
    pad = teacher_tokenizer.pad_token_id if teacher_tokenizer.pad_token_id is not None else 0
    student_ids = torch.stack([torch.as_tensor(r["input_ids"]).long() for r in rows])
    teacher_rows, pairs = [], []
    for ids in student_ids.tolist():
        teacher, run = [], []
        for i in ids:
            if s_table[i]:
                run.append(s_table[i])
                continue
            teacher += teacher_tokenizer(b"".join(run).decode(), add_special_tokens=False).input_ids
            teacher.append(teacher_tokenizer.eos_token_id)
            run = []
        teacher += teacher_tokenizer(b"".join(run).decode(), add_special_tokens=False).input_ids
        groups = align(ids, teacher, s_table, t_table)
        kept = groups.student_last + 1 < len(ids)
        pairs.append((groups.student_last[kept], groups.teacher_last[kept]))
        teacher_rows.append(teacher)
    width, count = max(map(len, teacher_rows)), max(len(s) for s, _ in pairs)
    batch = {
        "input_ids": student_ids,
        "attention_mask": torch.ones_like(student_ids),
        "labels": student_ids.clone(),
        "teacher_input_ids": torch.full((len(rows), width), pad),
        "teacher_attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "boundary_student": torch.full((len(rows), count), -1),
        "boundary_teacher": torch.full((len(rows), count), -1),
    }
    for row, (teacher, (s, t)) in enumerate(zip(teacher_rows, pairs, strict=True)):
        batch["teacher_input_ids"][row, : len(teacher)] = torch.tensor(teacher)
        batch["teacher_attention_mask"][row, : len(teacher)] = 1
        batch["boundary_student"][row, : len(s)] = torch.from_numpy(s)
        batch["boundary_teacher"][row, : len(t)] = torch.from_numpy(t)
    return batch
