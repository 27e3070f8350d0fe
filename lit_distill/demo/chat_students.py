"""The chat demo's students (SFT, soft-label, on-policy) and how every chat model is measured: the loss on the
held-out assistant tokens, and the teacher's scores of its replies to held-out prompts."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from .report import Layout, Row, WaitRow
from .training import (
    CHUNK_TOKENS,
    ON_POLICY,
    STUDENT_EMA_DECAY,
    STUDENT_GRADIENT_CLIP,
    _agreement,
    _Curve,
    _llama,
    _optimizer,
    _trainer,
    student_seed,
)

CHAT_TECHNIQUES = ("SFT", "soft-label", "on-policy")
#: the soft-label loss of the soft-label and on-policy students (the main demo's)
SOFT_LABEL = {"temperature": 2.0, "alpha": 0.5}
#: prompts per batch when replying to the held-out prompts (the same batches and seeds for every model)
REPLY_BATCH = 64


class TokenCount(Callback):
    """Counts the training batches' real tokens (``attention_mask``; padding left out), for tokens/s."""

    def __init__(self) -> None:
        self.tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += int(batch["attention_mask"].sum())


def wait_of(trainer) -> float:
    """The share of the training time the run waited for data (the modules' ``TokensPerSecond``)."""
    from ..reporting import TokensPerSecond

    timers = [c for c in trainer.callbacks if isinstance(c, TokensPerSecond)]
    return timers[0].data_wait_fraction if timers else math.nan


def train_chat_student(technique: str, teacher, chat, prompts, sizes: dict, ns, out: Path):
    """Train one student with ``technique`` on ``chat``'s conversations; its row and its validation curve."""
    import lightning.pytorch as pl

    from ..callbacks import LmbdaScheduler, StudentEMA
    from ..losses import DistillationLoss
    from ..modules import LanguageModelTraining, OnPolicyDistillation, SoftLabelDistillation

    seed = student_seed(ns)
    pl.seed_everything(seed, verbose=False)  # every student starts from the same weights and data order
    spec = _llama({**sizes, "seq_len": sizes["seq_len"] + sizes["reply_tokens"]}, "student", chat)  # prompt + reply
    optimizer = _optimizer(3e-3)
    common = {"optimizer": optimizer, "chunk_size": CHUNK_TOKENS}
    schedules = []
    if technique == "SFT":
        module = LanguageModelTraining(spec, optimizer=optimizer)
    elif technique == "soft-label":
        module = SoftLabelDistillation(spec, teacher, DistillationLoss(**SOFT_LABEL), **common)
    elif technique == "on-policy":  # the soft-label loss, and the same divergence on its own replies (ramped in)
        module = OnPolicyDistillation(
            spec, teacher, DistillationLoss(**ON_POLICY["loss"]),
            on_policy_loss=DistillationLoss(**ON_POLICY["on_policy_loss"]), mix=ON_POLICY["mix"], seed=seed,
            max_new_tokens=sizes["reply_tokens"], stop_token_ids=chat.stop_token_ids, **common,
        )  # fmt: skip
        start, end = ON_POLICY["lmbda"]
        schedules.append(LmbdaScheduler(start=start, end=end, total_steps=max(1, sizes["student_steps"] // 2)))
    else:
        raise ValueError(f"unknown chat technique {technique!r}; choose from {CHAT_TECHNIQUES}")
    print(f"student ({technique}): {sizes['student_steps']} steps")
    recorder = _Curve(chat, sizes["student_steps"], evaluate=lambda model: assistant_loss(model, chat)[0])
    counter = TokenCount()
    callbacks = [recorder, counter, *schedules, StudentEMA(decay=STUDENT_EMA_DECAY)]
    trainer = _trainer(sizes["student_steps"], sizes, out, f"chat-{technique}", callbacks, STUDENT_GRADIENT_CLIP)
    start = time.perf_counter()
    trainer.fit(module, chat)
    seconds = time.perf_counter() - start - recorder.seconds  # training (with Lightning's validation), not the plot
    module.student.eval()  # StudentEMA left the average in it
    ce, argmax = assistant_loss(module.student, chat)
    nll, reverse_kl = reply_scores(module.student, teacher, prompts, sizes, seed)
    row = WaitRow(
        f"student: {technique}", ce, math.exp(ce), _agreement(argmax, teacher.val_argmax), counter.tokens / seconds,
        seconds, nll, reverse_kl, data_wait_fraction=wait_of(trainer),
    )  # fmt: skip
    return row, [*recorder.points, (sizes["student_steps"], ce)]


@torch.no_grad()
def assistant_loss(model, chat, batch_size: int = 64) -> tuple[float, torch.Tensor]:
    """Token-mean CE of ``model`` on the assistant tokens of every held-out conversation (the tokens whose label
    is not ignored, as the students learn them), and its argmax at those tokens, in order."""
    import torch.nn.functional as F

    chat.setup()
    rows, device = chat.val_set, next(model.parameters()).device
    total, tokens, argmax = 0.0, 0, []
    for first in range(0, len(rows), batch_size):  # in order, without a DataLoader (whose iterator draws RNG)
        part = rows[first : first + batch_size]
        batch = chat.collate(
            [{"input_ids": i, "labels": t} for i, t in zip(part["input_ids"], part["labels"], strict=True)]
        )
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        labels = batch["labels"][:, 1:].to(device)
        counted = labels != -100
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()[counted]
        total += F.cross_entropy(logits, labels[counted], reduction="sum").item()
        tokens += int(counted.sum())
        argmax.append(logits.argmax(-1).cpu())
    return total / tokens, torch.cat(argmax)


@torch.no_grad()
def reply_scores(model, teacher, prompts, sizes: dict, seed: int) -> tuple[float, float]:
    """The teacher's mean NLL of ``model``'s replies to the first ``sizes["prompts"]`` held-out prompts, and the
    mean reverse KL ``KL(model ‖ teacher)`` at those tokens (``OnPolicyEvaluation``'s metrics).

    Each reply samples at T=1 up to ``reply_tokens`` tokens, ending at EOS (which counts); the batches' seeds
    come from ``seed``, so every model gets the same draws.
    """
    from ..callbacks.sample_quality import score_samples
    from ..modules.generation import derived_seed, prompts_as_prefixes

    prompts.setup()
    rows = prompts.val_set[: sizes["prompts"]]["input_ids"]
    sums = torch.zeros(3, dtype=torch.float64)
    for first in range(0, len(rows), REPLY_BATCH):
        batch = prompts_as_prefixes(prompts.collate([{"input_ids": ids} for ids in rows[first : first + REPLY_BATCH]]))
        scores = score_samples(
            model, teacher, batch["input_ids"], batch["attention_mask"].sum(1), max_new_tokens=sizes["reply_tokens"],
            seed=derived_seed(seed, first), stop_token_ids=prompts.stop_token_ids,
        )  # fmt: skip
        sums += torch.stack([s.double().cpu() for s in scores])
    nll, reverse_kl, tokens = sums.tolist()
    return nll / tokens, reverse_kl / tokens


def chat_verdict(rows: list[Row]) -> str:
    """How the distilled students compare with SFT alone (validation) and with each other (their replies)."""
    by_name = {r.model: r for r in rows}
    sft, soft, on = (by_name.get(f"student: {name}") for name in CHAT_TECHNIQUES)
    if sft is None or soft is None:
        return "(the verdict compares with the students trained by SFT and with soft labels: run both)"
    gain = sft.val_loss - soft.val_loss
    verdict = (
        f"soft-label distillation {'beats' if gain > 0 else 'trails'} SFT alone by {abs(gain):.4f} nats/token on the"
        " held-out assistant tokens"
    )
    if on is not None:
        verdict += (
            f"\non-policy: the teacher's NLL of its replies {on.teacher_nll_of_samples:.3f} against"
            f" {soft.teacher_nll_of_samples:.3f} for soft-label (rev KL {on.reverse_kl_on_samples:.3f} against"
            f" {soft.reverse_kl_on_samples:.3f}); validation loss {on.val_loss - sft.val_loss:+.4f} nats against"
            " SFT's (negative: lower)"
        )
    return verdict


CHAT = Layout(
    verdict=chat_verdict,
    sample_note=(
        "val loss: on the assistant tokens of the held-out conversations; tch NLL, rev KL: each model replies to"
        " held-out prompts (sampling at T=1, the same seed for all, up to EOS); the teacher's mean NLL of those"
        " tokens and the mean reverse KL(model || teacher) there; data wait: the share of the training time spent"
        " waiting for batches"
    ),
    baseline="SFT",
    bits_per_byte=False,
    title="lit-distill demo --chat: students of the same size and steps",
    ylabel="cross-entropy on held-out assistant tokens (nats/token)",
    data_wait=True,
)
