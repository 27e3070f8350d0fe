"""The demo's models: the teacher (trained once, then cached) and the students, and how they are measured."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from .measure import _agreement, _evaluate, held_out
from .report import Row


def _llama(sizes: dict, who: str, data):
    from ..models import CausalLM

    hidden, layers = sizes[f"{who}_hidden"], sizes[f"{who}_layers"]
    return CausalLM(
        config={
            "model_type": "llama",
            "vocab_size": data.vocab_size,
            "hidden_size": hidden,
            "intermediate_size": hidden * 8 // 3,
            "num_hidden_layers": layers,
            "num_attention_heads": max(1, hidden // 32),
            "max_position_embeddings": sizes["seq_len"],
            "tie_word_embeddings": True,
            **data.special_tokens,  # the BPE's: bos and eos are <|endoftext|> (0), pad is 1
        }
    )


#: held-out sequences whose first half each student continues, for the teacher's scores of its samples
SAMPLE_PROMPTS = 64
#: the on-policy student: the soft-label student's loss on every batch and, on a fraction lmbda of them (ramped
#: linearly from 0 at the first step to 1 at half the run: a student trained from scratch babbles at first),
#: the same divergence on its own continuations of the first half of each sequence (mix="both"). See
#: docs/experiments.md for what else was tried (GKD's either-or mix, reverse KL on the samples, lmbda fixed at 0.5).
ON_POLICY = {
    "loss": {"divergence": "forward_kl", "temperature": 2.0, "alpha": 0.5},
    "on_policy_loss": {"divergence": "forward_kl", "temperature": 2.0},
    "lmbda": (0.0, 1.0),
    "mix": "both",
}


#: tokens per chunk of the fused-linear losses. A batch's 2032 tokens in one chunk (what the memory plan allows)
#: took 123 ms per loss call (forward and backward, 2-core EPYC), two chunks 98 ms: the 33 MB fp32 logits of a
#: whole batch run slower than halves. docs/experiments.md.
CHUNK_TOKENS = 1024


def _optimizer(lr: float):
    def build(params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    return build


def _warmup_cosine(total_steps: int):
    """10% linear warmup, then cosine decay to a tenth of the peak learning rate."""
    warmup = max(1, total_steps // 10)

    def factor(step: int) -> float:
        decay = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps)))
        return min(1.0, (step + 1) / warmup) * decay

    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


#: the students' gradient-norm clip. At a constant rate of 3e-3 without warmup, the on-policy student (two
#: losses of different scales per batch) fell behind on one of six seeds without it (validation 4.90 against the
#: soft-label student's 4.78); clipped, 4.72. Every student clips alike; the teacher (cached) does not.
STUDENT_GRADIENT_CLIP = 1.0
#: every student is evaluated and kept as the moving average of its weights (StudentEMA). At the constant rate a
#: student's samples jittered by up to 0.3 of the teacher's NLL from one checkpoint to the next, 10 steps apart;
#: the average settles them and lowers every validation loss. docs/experiments.md.
STUDENT_EMA_DECAY = 0.9


def _trainer(max_steps: int, sizes: dict, out: Path, name: str, callbacks=(), gradient_clip_val=None):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from ..reporting import StepProgressBar

    return pl.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=max_steps,
        gradient_clip_val=gradient_clip_val,
        logger=TensorBoardLogger(out / "tensorboard", name=name),
        val_check_interval=sizes["val_every"],
        check_val_every_n_epoch=None,
        limit_val_batches=8,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        callbacks=[StepProgressBar(), *callbacks],  # the bar counts optimizer steps
    )


def cached_teacher(data, sizes: dict, ns, cache: Path, out: Path):
    """``(teacher, tokens/s of its training)``: the teacher from the cache (``nan`` tokens/s), or trained on
    ``data`` and cached; its ``name_or_path`` is its cache directory."""
    from transformers import AutoModelForCausalLM

    from ..modules import LanguageModelTraining

    spec = _llama(sizes, "teacher", data)
    # The teacher depends on its config, its sizes (not the students'), the seed and the tokenizer's vocabulary.
    vocabulary = sorted(data.tokenizer.get_vocab().items())
    own = {k: v for k, v in sizes.items() if not k.startswith("student_")}
    key = hashlib.sha1(json.dumps([spec.config, own, ns.seed, vocabulary], sort_keys=True).encode()).hexdigest()[:12]
    directory = cache / "demo" / f"teacher-{key}"
    start = time.perf_counter()
    if (directory / "config.json").exists() and not ns.retrain_teacher:
        print(f"teacher: reusing {directory}")
        model = AutoModelForCausalLM.from_pretrained(directory)
        tokens_per_sec = math.nan
    else:
        print(f"teacher: training {sizes['teacher_steps']} steps (cached afterwards in {directory})")
        module = LanguageModelTraining(
            spec, optimizer=_optimizer(3e-3), lr_scheduler=_warmup_cosine(sizes["teacher_steps"])
        )
        trainer = _trainer(sizes["teacher_steps"], sizes, out, "teacher")
        trainer.fit(module, data)
        module.save_student(str(directory))
        model = module.student
        tokens = sizes["teacher_steps"] * sizes["batch_size"] * sizes["seq_len"]
        tokens_per_sec = tokens / (time.perf_counter() - start)
    model.name_or_path = str(directory)  # the cache (offline.py) names the teacher by its directory
    return model, tokens_per_sec


def train_teacher(data, sizes: dict, ns, cache: Path, out: Path):
    """The teacher, from the cache or trained (and cached), in eval mode, and its row of the table."""
    start = time.perf_counter()
    model, tokens_per_sec = cached_teacher(data, sizes, ns, cache, out)
    model.eval()
    ce, bits, model.val_argmax = held_out(model, data)  # the students' agreement compares with the argmax
    wall = time.perf_counter() - start
    nll, reverse_kl = sample_scores(model, model, data, sizes, student_seed(ns))  # its own samples: KL 0
    return model, Row("teacher", ce, math.exp(ce), math.nan, tokens_per_sec, wall, nll, reverse_kl, bits)


class _Curve(Callback):
    """Records (step, CE of the student on the whole held-out split) at every validation but the last step's.

    Lightning's validation (TensorBoard's ``val/*``) reads only the first ``limit_val_batches`` batches; the
    plot's curves are measured like the table, whose number is the curve's last point. No RNG is drawn, so
    training is the same with or without this callback.
    """

    def __init__(self, data, max_steps: int, evaluate=None) -> None:
        self.data, self.max_steps = data, max_steps
        self.evaluate = evaluate  # model -> CE; default: the whole held-out split of the text data
        self.points: list[tuple[int, float]] = []
        self.seconds = 0.0  # spent on these evaluations, left out of the students' training time

    def on_validation_epoch_end(self, trainer, pl_module) -> None:  # inside StudentEMA's swap: the average
        if trainer.global_step >= self.max_steps:  # the final evaluation (the table's) adds this point
            return
        start = time.perf_counter()
        model = pl_module.student
        training = model.training
        model.eval()
        if self.evaluate is not None:
            ce = self.evaluate(model)
        else:
            ce, _ = _evaluate(model, self.data, batch_size=64)  # larger batches: the same CE, sooner
        model.train(training)
        self.points.append((trainer.global_step, ce))
        self.seconds += time.perf_counter() - start


def train_student(technique: str, teacher, data, sizes: dict, ns, out: Path, caches: dict | None = None):
    """Train one student with ``technique``; its row of the table and its validation curve ``[(step, CE)]``.

    ``caches`` holds the teacher cache of each offline technique (``offline.py``).
    """
    import lightning.pytorch as pl

    from ..losses import DistillationLoss
    from ..modules import (
        CoDistillation,
        HardLabelDistillation,
        LanguageModelTraining,
        OnPolicyDistillation,
        SoftLabelDistillation,
    )

    seed = student_seed(ns)
    pl.seed_everything(seed, verbose=False)  # every student starts from the same weights and data order
    train_data = data  # offline students read their teacher cache instead
    schedules = []
    spec = _llama(sizes, "student", data)
    optimizer = _optimizer(3e-3)  # a constant rate: at 250 steps a decay only slows the students
    common = {"optimizer": optimizer, "chunk_size": CHUNK_TOKENS}
    soft = DistillationLoss(temperature=2.0, alpha=0.5)
    if technique == "alone":
        module = LanguageModelTraining(spec, optimizer=optimizer)
    elif technique == "soft-label":
        module = SoftLabelDistillation(spec, teacher, soft, **common)
    elif technique == "hard-label":  # DeiT's hard distillation: half CE on the data, half on the teacher's argmax
        module = HardLabelDistillation(spec, teacher, DistillationLoss(), mode="argmax", label_weight=0.5, **common)
    elif technique == "co-distillation":  # the teacher keeps learning, gently: a tenth of the student's peak rate
        module = CoDistillation(spec, copy.deepcopy(teacher), soft, teacher_ce_weight=1.0, teacher_lr=3e-4, **common)
    elif technique == "on-policy":
        from ..callbacks import LmbdaScheduler

        half = sizes["seq_len"] // 2
        loss, on_policy_loss = DistillationLoss(**ON_POLICY["loss"]), DistillationLoss(**ON_POLICY["on_policy_loss"])
        options = {"on_policy_loss": on_policy_loss, "mix": ON_POLICY["mix"], "seed": seed}
        module = OnPolicyDistillation(spec, teacher, loss, prompt_length=half, max_new_tokens=half, **options, **common)
        start, end = ON_POLICY["lmbda"]
        ramp = max(1, sizes["student_steps"] // 2)
        schedules.append(LmbdaScheduler(start=start, end=end, total_steps=ramp))
    else:
        from .offline import offline_module

        module, train_data = offline_module(technique, spec, caches[technique], sizes, common)
    return fit_student(technique, module, train_data, data, schedules, sizes, out, teacher, seed)


def fit_student(technique, module, train_data, data, schedules, sizes: dict, out: Path, teacher=None, seed=0):
    """Train ``module`` on ``train_data`` and measure its student on ``data``'s held-out split: its row and its
    curve. Without a ``teacher`` (a student of another tokenizer) the agreement and sample scores are ``nan``."""
    from ..callbacks import StudentEMA

    print(f"student ({technique}): {sizes['student_steps']} steps")
    recorder = _Curve(data, sizes["student_steps"])
    callbacks = [recorder, *schedules, StudentEMA(decay=STUDENT_EMA_DECAY)]
    trainer = _trainer(sizes["student_steps"], sizes, out, technique, callbacks, STUDENT_GRADIENT_CLIP)
    start = time.perf_counter()
    trainer.fit(module, train_data)
    seconds = time.perf_counter() - start - recorder.seconds  # training (with Lightning's validation), not the plot
    module.student.eval()  # StudentEMA left the average in it
    ce, bits, argmax = held_out(module.student, data)
    agreement, nll, reverse_kl = math.nan, math.nan, math.nan
    if teacher is not None:
        agreement = _agreement(argmax, teacher.val_argmax)
        nll, reverse_kl = sample_scores(module.student, teacher, data, sizes, seed)
    tokens = sizes["student_steps"] * sizes["batch_size"] * sizes["seq_len"]
    row = Row(f"student: {technique}", ce, math.exp(ce), agreement, tokens / seconds, seconds, nll, reverse_kl, bits)
    return row, [*recorder.points, (sizes["student_steps"], ce)]


def sizes_of(ns, preset: dict, keys=None) -> dict:
    """``preset`` with the sizes given on the command line (those of ``keys``, default all) in place."""
    sizes = dict(preset)
    for key in sizes if keys is None else keys:
        value = getattr(ns, key, None)
        if value is not None and value <= 0:
            raise SystemExit(f"lit-distill demo: --{key.replace('_', '-')} must be positive")
        sizes[key] = sizes[key] if value is None else value
    return sizes


def student_seed(ns) -> int:
    """The students' seed (weights, data order, samples): ``--student-seed``, else the teacher's seed + 1."""
    return ns.student_seed if getattr(ns, "student_seed", None) is not None else ns.seed + 1


def sample_scores(model, teacher, data, sizes: dict, seed: int) -> tuple[float, float]:
    """The teacher's mean NLL of ``model``'s own continuations of held-out prompts, and the mean reverse KL
    ``KL(model ‖ teacher)`` at those positions (``OnPolicyEvaluation``'s metrics, on the demo's prompts).

    The first ``SAMPLE_PROMPTS`` held-out sequences are cut in half: the first half is the prompt, the model
    samples the second half (T=1, seeded by ``seed``: each student gets the same draws).
    """
    from ..callbacks.sample_quality import score_samples

    data.setup()
    prompts = data.val_blocks[:SAMPLE_PROMPTS].long()
    half = sizes["seq_len"] // 2
    lengths = torch.full((len(prompts),), half)
    scores = score_samples(model, teacher, prompts, lengths, max_new_tokens=half, seed=seed)
    tokens = float(scores.tokens)
    return float(scores.teacher_nll) / tokens, float(scores.reverse_kl) / tokens
