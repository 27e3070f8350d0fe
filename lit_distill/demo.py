"""``lit-distill demo``: distillation end to end on the bundled corpus, offline, on a laptop CPU.

1. Trains a byte-level BPE and a small teacher on the bundled Shakespeare (both cached for the next run).
2. Trains four same-size students for the same number of steps from the same initialization: one alone
   (plain cross-entropy), one with soft labels, one with the teacher's argmax as hard labels, and one
   co-distilled with a copy of the teacher that keeps training.
3. Evaluates every model on held-out whole works and prints a table; writes TensorBoard logs, a PNG of
   the validation curves and the table (``results.md``, ``results.json``) to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

PRESETS = {
    # about 7 minutes on 2 CPU cores, about 6 once the teacher is cached (README: The demo)
    "default": {
        "vocab_size": 4096,
        "seq_len": 128,
        "batch_size": 16,
        "teacher_hidden": 192,
        "teacher_layers": 4,
        "student_hidden": 96,
        "student_layers": 2,
        "teacher_steps": 600,
        "student_steps": 250,
        "val_every": 50,
        "max_train_tokens": None,
    },
    # about a minute: a smoke test of the pipeline (and the tests' size), too small to show a distillation gain
    "quick": {
        "vocab_size": 1024,
        "seq_len": 64,
        "batch_size": 8,
        "teacher_hidden": 64,
        "teacher_layers": 2,
        "student_hidden": 32,
        "student_layers": 1,
        "teacher_steps": 60,
        "student_steps": 30,
        "val_every": 10,
        "max_train_tokens": 200_000,
    },
}
TECHNIQUES = ("alone", "soft-label", "hard-label", "co-distillation")
QUICK_NOTE = (
    "--quick is a smoke test of the pipeline: its models are too small and trained too briefly to show the "
    "distillation gain (run without --quick for that)"
)


@dataclass
class Row:
    model: str
    val_loss: float
    val_ppl: float
    agreement: float
    tokens_per_sec: float
    wall_seconds: float


DESCRIPTION = (
    "Distillation end to end on the bundled Shakespeare, offline, on a CPU: trains a tokenizer and a small "
    "teacher (both cached), then four students of the same size and steps (trained alone, soft-label, "
    "hard-label, co-distilled), and prints their validation loss on held-out works. Writes the table "
    "(results.md, results.json), a plot of the validation curves and TensorBoard logs to --out. About seven "
    "minutes on 2 CPU cores the first time, about six once the tokenizer and teacher are cached."
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lit-distill demo", description=DESCRIPTION)
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: tiny sizes, about a minute; too small to show the distillation gain",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("lit-distill-demo"),
        metavar="DIR",
        help="table, plot and logs (default %(default)s)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="tokenizer and teacher cache (default: $LIT_DISTILL_CACHE, else $XDG_CACHE_HOME/lit-distill, "
        "else ~/.cache/lit-distill)",
    )
    p.add_argument("--seed", type=int, default=0, help="teacher seed; the students use seed + 1 (default 0)")
    p.add_argument("--retrain-teacher", action="store_true", help="ignore a cached teacher")
    for key, value in PRESETS["default"].items():
        if key != "max_train_tokens":
            quick = PRESETS["quick"][key]
            p.add_argument(
                f"--{key.replace('_', '-')}",
                type=int,
                default=None,
                metavar="N",
                help=f"default {value} (--quick: {quick})",
            )
    return p


def demo_main(argv: list[str] | None = None) -> list[Row]:
    ns = _parser().parse_args(argv)
    sizes = dict(PRESETS["quick" if ns.quick else "default"])
    for key in sizes:
        value = getattr(ns, key, None)
        if value is not None:
            if value <= 0:
                raise SystemExit(f"lit-distill demo: --{key.replace('_', '-')} must be positive")
            sizes[key] = value
    import lightning.pytorch as pl

    from .console import quiet
    from .data import TextDataModule, default_cache_dir, writable_dir

    quiet()  # Lightning's banner and tips for each of the five trainers, Hugging Face's bars
    cache = writable_dir(ns.cache_dir or default_cache_dir())
    out = writable_dir(ns.out)
    pl.seed_everything(ns.seed, verbose=False)
    print(f"lit-distill demo ({'quick' if ns.quick else 'default'} sizes): {sizes}")
    if ns.quick:
        print(QUICK_NOTE)
    data = TextDataModule(
        vocab_size=sizes["vocab_size"],
        seq_len=sizes["seq_len"],
        batch_size=sizes["batch_size"],
        cache_dir=str(cache),
        max_train_tokens=sizes["max_train_tokens"],
    )
    info = data.describe()
    print(
        f"corpus: {info['train_documents']} works for training ({info['train_tokens']:,} tokens), "
        f"{info['val_documents']} held out ({info['val_tokens']:,} tokens), vocabulary {info['vocab_size']}"
    )

    teacher, teacher_row = _teacher(data, sizes, ns, cache, out)
    rows, curves = [teacher_row], {}
    for technique in TECHNIQUES:
        row, curve = _student(technique, teacher, data, sizes, ns, out)
        rows.append(row)
        curves[technique] = curve
    _report(rows, curves, sizes, out, quick=ns.quick)
    return rows


def _llama(sizes: dict, who: str, vocab: int):
    from .models import CausalLM

    hidden, layers = sizes[f"{who}_hidden"], sizes[f"{who}_layers"]
    return CausalLM(
        config={
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": hidden * 8 // 3,
            "num_hidden_layers": layers,
            "num_attention_heads": max(1, hidden // 32),
            "max_position_embeddings": sizes["seq_len"],
            "tie_word_embeddings": True,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "pad_token_id": 1,
        }
    )


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


def _trainer(max_steps: int, sizes: dict, out: Path, name: str, recorder=None):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    return pl.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=max_steps,
        logger=TensorBoardLogger(out / "tensorboard", name=name),
        val_check_interval=sizes["val_every"],
        check_val_every_n_epoch=None,
        limit_val_batches=8,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        callbacks=[recorder] if recorder else [],
    )


def _teacher(data, sizes: dict, ns, cache: Path, out: Path):
    from transformers import AutoModelForCausalLM

    from .modules import LanguageModelTraining

    spec = _llama(sizes, "teacher", data.vocab_size)
    # The teacher depends on its config, the sizes, the seed and the tokenizer's vocabulary.
    vocabulary = sorted(data.tokenizer.get_vocab().items())
    key = hashlib.sha1(json.dumps([spec.config, sizes, ns.seed, vocabulary], sort_keys=True).encode()).hexdigest()[:12]
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
    model.eval()
    ce, agreement = _evaluate(model, None, data)
    return model, Row("teacher", ce, math.exp(ce), agreement, tokens_per_sec, time.perf_counter() - start)


class _Curve(Callback):
    """Records (step, CE of the student on the whole held-out split) at every validation but the last step's.

    Lightning's validation (TensorBoard's ``val/*``) reads only the first ``limit_val_batches`` batches; the
    plot's curves are measured like the table, whose number is the curve's last point. No RNG is drawn, so
    training is the same with or without this callback.
    """

    def __init__(self, data, max_steps: int) -> None:
        self.data, self.max_steps = data, max_steps
        self.points: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.global_step >= self.max_steps:  # the final evaluation (the table's) adds this point
            return
        model = pl_module.student
        training = model.training
        model.eval()
        ce, _ = _evaluate(model, None, self.data, batch_size=64)  # larger batches: the same CE, sooner
        model.train(training)
        self.points.append((trainer.global_step, ce))


def _student(technique: str, teacher, data, sizes: dict, ns, out: Path):
    import lightning.pytorch as pl

    from .losses import DistillationLoss
    from .modules import CoDistillation, HardLabelDistillation, LanguageModelTraining, SoftLabelDistillation

    pl.seed_everything(ns.seed + 1, verbose=False)  # every student starts from the same weights and data order
    spec = _llama(sizes, "student", data.vocab_size)
    common = {"optimizer": _optimizer(3e-3)}  # a constant rate: at 250 steps a decay only slows the students
    soft = DistillationLoss(temperature=2.0, alpha=0.5)
    if technique == "alone":
        module = LanguageModelTraining(spec, **common)
    elif technique == "soft-label":
        module = SoftLabelDistillation(spec, teacher, soft, **common)
    elif technique == "hard-label":
        module = HardLabelDistillation(spec, teacher, DistillationLoss(), mode="argmax", **common)
    else:  # the teacher keeps learning, gently: a tenth of the student's peak rate
        module = CoDistillation(spec, copy.deepcopy(teacher), soft, teacher_ce_weight=1.0, teacher_lr=3e-4, **common)
    print(f"student ({technique}): {sizes['student_steps']} steps")
    recorder = _Curve(data, sizes["student_steps"])
    trainer = _trainer(sizes["student_steps"], sizes, out, technique, recorder)
    start = time.perf_counter()
    trainer.fit(module, data)
    seconds = time.perf_counter() - start
    module.student.eval()
    ce, agreement = _evaluate(module.student, teacher, data)
    tokens = sizes["student_steps"] * sizes["batch_size"] * sizes["seq_len"]
    row = Row(f"student: {technique}", ce, math.exp(ce), agreement, tokens / seconds, seconds)
    return row, [*recorder.points, (sizes["student_steps"], ce)]


@torch.no_grad()
def _evaluate(model, teacher, data, batch_size: int | None = None) -> tuple[float, float]:
    """Token-mean CE of ``model`` on the whole validation split, and its argmax agreement with ``teacher``."""
    import torch.nn.functional as F

    total, tokens, agree = 0.0, 0, 0
    device = next(model.parameters()).device
    data.setup()
    # The validation loader's batches in its order, without a DataLoader (whose iterator draws from the RNG).
    for batch in data.val_blocks.split(batch_size or data.batch_size):
        ids = batch.to(device)
        logits = model(input_ids=ids).logits[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        tokens += ids[:, 1:].numel()
        if teacher is not None:
            agree += (logits.argmax(-1) == teacher(input_ids=ids).logits[:, :-1].argmax(-1)).sum().item()
    return total / tokens, (agree / tokens if teacher is not None else math.nan)


def _report(rows: list[Row], curves: dict, sizes: dict, out: Path, quick: bool = False) -> None:
    header = f"{'model':<28} {'val loss':>9} {'val ppl':>9} {'agreement':>10} {'tokens/s':>9} {'wall s':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        agreement = "" if math.isnan(r.agreement) else f"{r.agreement:.3f}"
        speed = "cached" if math.isnan(r.tokens_per_sec) else f"{r.tokens_per_sec:,.0f}"
        lines.append(
            f"{r.model:<28} {r.val_loss:>9.4f} {r.val_ppl:>9.2f} {agreement:>10} {speed:>9} {r.wall_seconds:>8.1f}"
        )
    table = "\n".join(lines)
    print("\n" + table)
    alone = next(r for r in rows if r.model == "student: alone")
    soft = next(r for r in rows if r.model == "student: soft-label")
    gain = alone.val_loss - soft.val_loss
    verdict = (
        f"soft-label distillation {'beats' if gain > 0 else 'trails'} training alone by {abs(gain):.4f} "
        "nats/token of validation loss"
    )
    if quick:
        verdict += f"\n{QUICK_NOTE}"
    print(verdict)
    (out / "results.md").write_text(f"```\n{table}\n```\n\n{verdict}\n\nsizes: {sizes}\n")
    (out / "results.json").write_text(
        json.dumps({"rows": [asdict(r) for r in rows], "curves": curves, "sizes": sizes}, indent=2)
    )
    png = _plot(curves, rows, out / "validation_curves.png")
    print(
        f"wrote {out / 'results.md'}, {out / 'results.json'}"
        + (f", {png}" if png else "")
        + f"; TensorBoard logs: tensorboard --logdir {out / 'tensorboard'}"
    )


# Curves can coincide (soft-label and co-distillation while the co-distilled teacher barely moves, as with
# --quick): soft-label is a wide translucent band, co-distillation a thin dashed line drawn over it.
_STYLES = {
    "alone": {"linestyle": "-", "marker": "o", "markersize": 4},
    "soft-label": {"linestyle": "-", "linewidth": 5, "alpha": 0.4, "marker": "s", "markersize": 8},
    "hard-label": {"linestyle": ":", "linewidth": 2, "marker": "^", "markersize": 5},
    "co-distillation": {"linestyle": "--", "linewidth": 1.5, "marker": "D", "markersize": 4},
}


def _plot(curves: dict, rows: list[Row], path: Path) -> Path | None:
    """Writes the validation curves to ``path``; None when matplotlib cannot be imported."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = _figure(curves, rows)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _figure(curves: dict, rows: list[Row]):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    teacher = next(r for r in rows if r.model == "teacher")
    # Scale to the student trained alone: a curve far above it (hard labels can be) is named, not drawn flat.
    baseline = [v for _, v in curves.get("alone", [])] or [teacher.val_loss]
    top = max(baseline) + 0.5
    steps = sorted({step for points in curves.values() for step, _ in points})
    for name, points in curves.items():
        if points:
            end = points[-1][1]
            off = min(v for _, v in points) > top
            ax.plot(
                *zip(*points, strict=True),
                **_STYLES.get(name, {"marker": "o"}),
                label=f"{name} (above the chart: {end:.2f} at the end)" if off else f"{name}: {end:.3f} at the end",
            )
    ax.axhline(teacher.val_loss, color="gray", linestyle="--", label=f"teacher (final): {teacher.val_loss:.3f}")
    ax.set_ylim(min(teacher.val_loss, *baseline) - 0.2, top)
    if 0 < len(steps) <= 12:
        ax.set_xticks(steps)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on held-out works (nats/token)")
    ax.set_title("lit-distill demo: students of the same size and steps")
    ax.legend(title="whole held-out split (last point = the table)", title_fontsize="small", fontsize="small")
    fig.tight_layout()
    return fig
