"""``lit-distill demo``: distillation end to end on the bundled corpus, offline, on a laptop CPU.

1. Trains a byte-level BPE and a small teacher on the bundled Shakespeare (both cached for the next run).
2. Trains same-size students for the same number of steps from the same initialization: one alone
   (plain cross-entropy), one with soft labels, one with the teacher's argmax as hard labels (half, beside
   the data's labels: DeiT's hard distillation), one on-policy (on its own samples, half its batches), one
   co-distilled with a copy of the teacher that keeps training (only with ``--techniques``: it makes room for
   the two students of step 2's end within about ten minutes), and two offline from teacher caches
   (top-k with a tail bucket, and sampled; ``offline.py``), written once and cached; then two students with a
   tokenizer of their own (a SentencePiece-style BPE of 2048 tokens with byte fallback, trained on the same
   split and cached): one alone, one from the teacher across the tokenizers (``cross_tokenizer.py``).
3. Evaluates every model on held-out whole works (cross-entropy per token, and bits per byte, which compares
   students of different tokenizers), and scores its own continuations of held-out prompts by
   the teacher; prints a table, writes TensorBoard logs, a PNG of the validation curves and the table
   (``results.md``, ``results.json``) to ``--out``. ``--techniques`` and ``--student-seed`` run a subset
   of the students with another seed (how docs/experiments.md's seed comparisons were measured).

``--chat`` runs the chat demo instead (``chat.py``): the teacher fine-tuned on dialogues from the plays, and three
students on their assistant turns.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cross_tokenizer import OTHER_TOKENIZER_TECHNIQUES, boundary_note, overlap_note, train_other_tokenizer_student
from .offline import OFFLINE, write_caches
from .report import Row, report
from .start import start, text_data
from .training import sizes_of, train_student, train_teacher

PRESETS = {
    # about 10 minutes on 2 CPU cores, about 7 once the teacher and its caches are cached (docs/experiments.md)
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
        "val_every": 125,
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
TECHNIQUES = (
    *("alone", "soft-label", "hard-label", "co-distillation", "on-policy"),
    *OFFLINE,
    *OTHER_TOKENIZER_TECHNIQUES,  # a student with its own tokenizer, alone and from the teacher (cross_tokenizer.py)
)
#: the students a plain ``lit-distill demo`` trains: all but co-distillation (96 s; it lands with soft-label), which
#: makes room for the two with their own tokenizer within about ten minutes (docs/experiments.md)
DEFAULT_TECHNIQUES = tuple(t for t in TECHNIQUES if t != "co-distillation")

DESCRIPTION = (
    "Distillation end to end on the bundled Shakespeare, offline, on a CPU: trains a tokenizer and a small "
    "teacher (both cached), then six students of the same size and steps (trained alone, soft-label, "
    "hard-label, on-policy, and two from teacher caches: top-k and sampled; co-distillation with --techniques) "
    "and two with a tokenizer of their own (alone, and cross-tokenizer from the teacher), and prints their "
    "validation loss "
    "and bits per byte on held-out works and the teacher's scores of their own samples. Writes the table "
    "(results.md, results.json), a plot of the validation curves and TensorBoard logs to --out. About ten "
    "minutes on 2 CPU cores the first time, about seven once the tokenizer, teacher and caches are cached."
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
    p.add_argument(
        "--student-seed",
        type=int,
        default=None,
        metavar="N",
        help="the students' seed: initialization, data order, samples (default: --seed + 1)",
    )
    p.add_argument(
        "--techniques",
        type=_techniques,
        default=DEFAULT_TECHNIQUES,
        metavar="LIST",
        help="comma-separated students to train, of "
        + ",".join(name.replace(" ", "-") for name in TECHNIQUES)
        + " (default: all but co-distillation)",
    )
    p.add_argument("--retrain-teacher", action="store_true", help="ignore a cached teacher")
    p.add_argument(
        "--chat",
        action="store_true",
        help="the chat demo instead: fine-tunes the teacher on dialogues from the bundled plays (cached), then "
        "trains three students on the assistant turns (SFT alone, soft-label, on-policy from the prompts) and "
        "scores their replies to held-out prompts; about four minutes on 2 CPU cores with the teacher cached. "
        "--student-*, --batch-size, --val-every and --student-seed apply to its students, the other sizes to the "
        "teacher it starts from (the main demo's)",
    )
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


def _techniques(text: str) -> tuple[str, ...]:
    """Technique names, comma-separated; a dash may stand for a space (offline-top-k)."""
    known = {name.replace(" ", "-"): name for name in TECHNIQUES}
    names = [name.strip().replace(" ", "-") for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown technique {unknown or text!r}; choose from {', '.join(known)}")
    return tuple(known[name] for name in names)


def demo_main(argv: list[str] | None = None) -> list[Row]:
    ns = _parser().parse_args(argv)
    if ns.chat:
        from .chat import CHAT_TECHNIQUES, chat_main

        if ns.techniques != DEFAULT_TECHNIQUES:
            students = ", ".join(CHAT_TECHNIQUES)
            raise SystemExit(f"lit-distill demo: --techniques picks the main demo's students; --chat trains {students}")
        return chat_main(ns, PRESETS["quick" if ns.quick else "default"])
    sizes = sizes_of(ns, PRESETS["quick" if ns.quick else "default"])
    cache, out = start(ns, "lit-distill demo", sizes)
    data = text_data(sizes, cache)
    info = data.describe()
    print(
        f"corpus: {info['train_documents']} works for training ({info['train_tokens']:,} tokens), "
        f"{info['val_documents']} held out ({info['val_tokens']:,} tokens), vocabulary {info['vocab_size']}"
    )

    teacher, teacher_row = train_teacher(data, sizes, ns, cache, out)
    offline = [t for t in ns.techniques if t in OFFLINE]
    caches, notes = write_caches(teacher, data, sizes, ns, cache, offline)
    if any(t in OTHER_TOKENIZER_TECHNIQUES for t in ns.techniques):
        notes += [overlap_note(data, sizes, cache), boundary_note(data, sizes, cache)]
    rows, curves = [teacher_row], {}
    for technique in ns.techniques:
        if technique in OTHER_TOKENIZER_TECHNIQUES:
            row, curve = train_other_tokenizer_student(technique, teacher, data, sizes, ns, out, cache)
        else:
            row, curve = train_student(technique, teacher, data, sizes, ns, out, caches)
        rows.append(row)
        curves[technique] = curve
    report(rows, curves, sizes, out, quick=ns.quick, notes=notes)
    return rows
