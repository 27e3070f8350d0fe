"""Corpora larger than memory: ``python -m bench.data_loading --help``.

Four measurements on a synthetic jsonl corpus (documents of a few KB of seeded random words from a vocabulary of
4,000 pseudo-words, written into ``--work``) and one byte-level BPE of 4,096 tokens trained on its first 5 MB:

- memory: the corpus (``--corpus-mb``) and a small one (its first ``--small-mb``) prepared with ``prepare_text``
  (``num_proc`` 2, timed), then 50 training steps of a tiny Llama on each, ``TextDataModule(prepared=DIR)``, each in
  a fresh process that reports its peak RSS; and the small one from ``files=`` (the data module prepares it into
  its cache inside that process). Bar: the two prepared runs' peaks differ by at most 300 MB;
- preparing: ``prepare_text`` (``num_proc`` None: one process and the tokenizer's threads, and 2) on the first
  ``--prepare-mb`` of the corpus, once ``datasets`` has read the jsonl into Arrow (timed apart), against the same
  documents encoded by the tokenizer in one process (``tokenizer(texts)`` a thousand at a time, only the calls
  timed); the token counts must agree;
- reading: rows and tokens per second of ``train_dataloader()`` without a model, for the prepared corpus
  (read row by row) and for ``StreamingTextDataModule`` on the jsonl, against the demo's soft-label student's
  training speed. Bar: reading at least 20x faster;
- start-up: ``lit-distill fit --config configs/teacher.yaml --trainer.max_steps 1`` (no validation, no progress
  bar) on the bundled corpus with a fresh ``LIT_DISTILL_CACHE``, twice: the first run trains the BPE and prepares,
  the second reads the prepared corpus. Timed from the process's launch to the start of its first training step (a
  callback prints the time).

``--quick`` runs it at tiny sizes, without the ``files=`` run, with one torch thread per process
(``OMP_NUM_THREADS=1``: on a busy 2-core machine two threads made each step 10x slower): a check that it works
rather than a measurement.

Each measurement prints a table and writes ``data_loading-<name>-<time>.csv`` to ``--out`` as soon as it is done.
The corpora and the tokenizer stay in ``--work`` (the next run reuses them); what the runs write (prepared
directories, ``datasets`` caches, caches, logs) goes to a folder inside it that is removed at the end.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
SEQ_LEN, BATCH_SIZE, NUM_PROC = 128, 16, 2
TOKENIZER_MB = 5  # the BPE is trained on the corpus's first 5 MB
#: the training speed reading is compared with: the demo's soft-label student (docs/experiments.md, "The first
#: run's table": 2026-11-30, 2-core AMD EPYC, torch 2.13.0 CPU)
DEMO_SOFT_LABEL_TOKENS_PER_S = 11_204
DEMO_SOURCE = "docs/experiments.md, the demo's soft-label student, 2026-11-30, 2-core AMD EPYC"
READING_BAR, MEMORY_BAR_MB = 20, 300
FIRST_STEP = "data_loading first step at "  # what FirstStepClock prints, then time.time()
TOKENIZING = "tokenizing the train split"  # prepare_text's progress bar
STUDENT = {  # a tiny Llama: the steps are quick and the data's share of the memory is what moves
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": SEQ_LEN,
    "tie_word_embeddings": True,
}


class FirstStepClock(Callback):
    """Prints the wall-clock time (``time.time()``) when the first training batch starts, for the start-up
    measurement: ``--trainer.callbacks+={"class_path": "bench.data_loading.FirstStepClock"}``."""

    @override
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and batch_idx == 0:
            print(f"{FIRST_STEP}{time.time():.6f}", flush=True)


# ------------------------------------------------------------------------------------------ the corpus
def vocabulary(seed: int, size: int = 4000) -> tuple[list[str], list[float]]:
    """``size`` pseudo-words of 1 to 4 syllables and their Zipf weights (1/rank, ranks shuffled)."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "v", "w", "br", "ch", "st", "th"]
    syllables = [o + v + c for o in onsets for v in "aeiouy" for c in ("", "n", "r", "s", "t", "l")]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choices(syllables, k=rng.choice((1, 1, 2, 2, 2, 3, 3, 4)))))
    ordered = sorted(words)
    rng.shuffle(ordered)
    return ordered, list(itertools.accumulate(1 / rank for rank in range(1, size + 1)))


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> None:
    """A jsonl corpus of at least ``megabytes`` MiB: documents of 400 to 900 words (2.5 to 6 KB) in sentences of
    6 to 20 and paragraphs of 3 to 8 sentences; the same seed writes the same documents, so a smaller corpus is
    the start of a larger one. Written under a temporary name and renamed: a file of that name is whole."""
    words, cumulative = vocabulary(seed)
    rng = random.Random(seed + 1)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    size, limit = 0, int(megabytes * MIB)
    with tmp.open("w") as f:
        while size < limit:
            paragraphs, left = [], rng.randint(400, 900)
            while left > 0:
                sentences = []
                for _ in range(rng.randint(3, 8)):
                    chosen = rng.choices(words, cum_weights=cumulative, k=rng.randint(6, 20))
                    sentences.append(" ".join(chosen).capitalize() + rng.choice(".....?!"))
                    left -= len(chosen)
                paragraphs.append(" ".join(sentences))
            line = json.dumps({"text": "\n\n".join(paragraphs)}) + "\n"
            f.write(line)
            size += len(line)
    os.replace(tmp, path)


def head_of(source: Path, path: Path, megabytes: float) -> None:
    """The first lines of ``source`` that hold ``megabytes`` MiB (at least one line)."""
    limit, size = int(megabytes * MIB), 0
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with source.open() as f, tmp.open("w") as out:
        for line in f:
            out.write(line)
            size += len(line)
            if size >= limit:
                break
    os.replace(tmp, path)


def corpus(work: Path, megabytes: float, source: Path | None = None) -> Path:
    """The corpus of ``megabytes`` MiB in ``work`` (``source``'s first lines, or written), reused when there."""
    path = work / f"corpus-{megabytes:g}mb.jsonl"
    if not path.exists():
        start = time.perf_counter()
        head_of(source, path, megabytes) if source else write_corpus(path, megabytes)
        print(f"wrote {path} ({path.stat().st_size / MIB:,.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return path


def documents(path: Path, batch: int = 1000):
    """The corpus's texts, ``batch`` at a time."""
    with path.open() as f:
        while lines := list(itertools.islice(f, batch)):
            yield [json.loads(line)["text"] for line in lines]


def tokenizer_dir(work: Path, source: Path) -> str:
    """The BPE of 4,096 tokens trained on ``source``'s first 5 MB, saved to ``work/tokenizer`` (reused)."""
    directory = work / "tokenizer"
    if not (directory / "tokenizer.json").exists():
        from lit_distill.data import train_bpe

        texts, size = [], 0
        for text in itertools.chain.from_iterable(documents(source)):
            texts.append(text)
            size += len(text)
            if size >= TOKENIZER_MB * MIB:
                break
        with tempfile.TemporaryDirectory() as cache:  # train_bpe's own cache: not kept
            train_bpe(texts, 4096, cache).save_pretrained(directory)
    return str(directory)


# ------------------------------------------------------------------------------------------ measurements
def peak_rss_kib() -> int:
    """This process's peak resident memory in KiB: ``VmHWM`` of its own address space. Not ``ru_maxrss``, which
    Linux carries over from the parent at fork and across exec (a child of a large parent reports the parent's)."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; bytes on macOS


def prepare(path: Path, tokenizer, out: Path, num_proc: int | None = NUM_PROC) -> dict:
    """``prepare_text`` of ``path`` into ``out`` with ``num_proc`` processes: seconds and counts."""
    from lit_distill.data import prepare_text

    start = time.perf_counter()
    meta = prepare_text([str(path)], tokenizer, out, seq_len=SEQ_LEN, num_proc=num_proc)
    seconds = time.perf_counter() - start
    tokens = sum(meta.tokens.values())
    return {"seconds": seconds, "documents": sum(meta.documents.values()), "tokens": tokens,
            "train_rows": meta.rows("train"), "tokens_per_s": tokens / seconds,
            "bin_MiB": sum((out / f"{s}.bin").stat().st_size for s in meta.tokens) / MIB}  # fmt: skip


def plain_encoding(path: Path, tokenizer) -> dict:
    """The documents encoded in this process a thousand at a time (only the tokenizer calls timed); tokens
    count one EOS per document, as the prepared files hold."""
    seconds, tokens, count = 0.0, 0, 0
    for texts in documents(path):
        start = time.perf_counter()
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        seconds += time.perf_counter() - start
        tokens += sum(len(x) + 1 for x in ids)
        count += len(texts)
    return {"seconds": seconds, "documents": count, "tokens": tokens, "tokens_per_s": tokens / seconds}


def train_in_child(data: dict, steps: int, root: Path, env: dict) -> dict:
    """``steps`` training steps of the tiny student on ``TextDataModule(**data)`` in a fresh process."""
    spec = json.dumps({"data": data, "steps": steps, "root": str(root)})
    proc = subprocess.run([sys.executable, "-m", "bench.data_loading", "--train-child", spec], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"training on {data} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _train_child(spec: dict) -> None:
    """The fresh process of :func:`train_in_child`: trains, then prints its peak RSS and what it trained."""
    import lightning.pytorch as pl

    from lit_distill.data import TextDataModule
    from lit_distill.models import CausalLM
    from lit_distill.modules import LanguageModelTraining

    pl.seed_everything(0, verbose=False)
    start = time.perf_counter()
    data = TextDataModule(seq_len=SEQ_LEN, batch_size=BATCH_SIZE, **spec["data"])
    config = {**STUDENT, "vocab_size": data.vocab_size, **data.special_tokens}
    module = LanguageModelTraining(CausalLM(config=config), vocab_size=data.vocab_size)
    trainer = pl.Trainer(
        max_steps=spec["steps"], accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False, default_root_dir=spec["root"],
    )  # fmt: skip
    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_seconds = time.perf_counter() - fit_start
    result = {
        "peak_rss_kib": peak_rss_kib(),
        "steps": trainer.global_step,
        "train_rows": len(data.train_set),
        "fit_seconds": fit_seconds,
        "seconds": time.perf_counter() - start,
        "train_tokens_per_s": trainer.global_step * BATCH_SIZE * SEQ_LEN / fit_seconds,
    }
    print(json.dumps(result))


def read_batches(loader, batches: int) -> dict:
    """Iterate ``batches`` batches of ``loader``: seconds (the first batch's on its own too), rows and tokens."""
    start = time.perf_counter()
    first, rows, tokens, count = None, 0, 0, 0
    for batch in itertools.islice(loader, batches):
        ids = batch["input_ids"]
        rows, tokens, count = rows + ids.shape[0], tokens + ids.numel(), count + 1
        first = first if first is not None else time.perf_counter() - start
    seconds = time.perf_counter() - start
    return {"batches": count, "rows": rows, "tokens": tokens, "seconds": seconds, "first_batch_s": first,
            "rows_per_s": rows / seconds, "tokens_per_s": tokens / seconds}  # fmt: skip


def fit_cli(directory: Path, env: dict) -> dict:
    """``lit-distill fit`` of configs/teacher.yaml for one step in ``directory`` (it exports its model there):
    seconds from the launch to the first step and to the end, and whether it tokenized the corpus."""
    directory.mkdir(parents=True)
    clock = json.dumps({"class_path": "bench.data_loading.FirstStepClock"})
    args = ["fit", "--config", str(ROOT / "configs" / "teacher.yaml"), "--trainer.max_steps", "1",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            f"--trainer.callbacks+={clock}"]  # fmt: skip
    launched = time.time()
    proc = subprocess.run([sys.executable, "-m", "lit_distill.cli", *args], cwd=directory, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip
    wall = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"lit-distill fit failed:\n{proc.stderr[-3000:]}")
    stamps = [float(line.split(FIRST_STEP)[1]) for line in proc.stdout.splitlines() if FIRST_STEP in line]
    return {"first_step_s": stamps[0] - launched if stamps else float("nan"), "wall_s": wall,
            "tokenized": TOKENIZING in proc.stderr}  # fmt: skip


# ------------------------------------------------------------------------------------------ the sections
def memory_section(ns, env: dict, tokenizer, big: Path, small: Path, run: Path) -> list[dict]:
    rows = []
    for name, path in (("corpus", big), ("small", small)):
        directory = run / f"prepared-{name}"
        counts = prepare(path, tokenizer, directory)
        child = train_in_child({"prepared": str(directory)}, ns.steps, run, env)
        rows.append(_memory_row(name, path, "prepared=DIR", counts, child))
    if not ns.quick:  # the run that prepares for itself (left out of --quick to keep it well under a minute)
        auto = {"files": [str(small)], "tokenizer": str(ns.work / "tokenizer"), "cache_dir": str(run / "auto-cache"),
                "num_proc": NUM_PROC}  # fmt: skip
        child = train_in_child(auto, ns.steps, run, env)
        rows.append(_memory_row("small", small, "files= (prepares in the process)", {}, child))
    return rows


def _memory_row(name: str, path: Path, read: str, prepared: dict, child: dict) -> dict:
    return {
        "corpus": name, "corpus_MiB": round(path.stat().st_size / MIB, 1), "read": read,
        "documents": prepared.get("documents", ""), "tokens": prepared.get("tokens", ""),
        "train_rows": child["train_rows"], "bin_MiB": round(prepared["bin_MiB"], 1) if prepared else "",
        "prepare_s": round(prepared["seconds"], 2) if prepared else "",
        "prepare_tokens_per_s": round(prepared["tokens_per_s"]) if prepared else "",
        "steps": child["steps"], "peak_rss_MiB": round(child["peak_rss_kib"] / 1024, 1),
        "train_tokens_per_s": round(child["train_tokens_per_s"]), "child_s": round(child["seconds"], 2),
    }  # fmt: skip


def prepare_section(ns, tokenizer, big: Path, run: Path) -> list[dict]:
    from lit_distill.data.corpus import document_splits

    path = big if ns.prepare_mb <= 0 or ns.prepare_mb >= ns.corpus_mb else corpus(ns.work, ns.prepare_mb, big)
    # The jsonl is read into datasets' Arrow cache once, timed on its own, so both prepares below start warm.
    start = time.perf_counter()
    document_splits([str(path)])
    arrow_s = time.perf_counter() - start
    runs = {n: prepare(path, tokenizer, run / f"prepared-slice-{n}", num_proc=n) for n in (None, NUM_PROC)}
    plain = plain_encoding(path, tokenizer)
    if any(r["tokens"] != plain["tokens"] for r in runs.values()):
        raise RuntimeError(f"prepare_text wrote {[r['tokens'] for r in runs.values()]} tokens, the tokenizer gives"
                           f" {plain['tokens']}")  # fmt: skip
    common = {"corpus_MiB": round(path.stat().st_size / MIB, 1), "documents": plain["documents"],
              "tokens": plain["tokens"]}  # fmt: skip
    rows = [{"method": "reading the jsonl into Arrow (first time)", **common, "seconds": round(arrow_s, 3),
             "tokens_per_s": round(plain["tokens"] / arrow_s), "vs_plain": ""}]  # fmt: skip
    for n, prepared in runs.items():
        rows.append({"method": f"prepare_text num_proc={n}", **common, "seconds": round(prepared["seconds"], 3),
                     "tokens_per_s": round(prepared["tokens_per_s"]),
                     "vs_plain": round(prepared["tokens_per_s"] / plain["tokens_per_s"], 2)})  # fmt: skip
    rows.append({"method": "tokenizer(texts), 1 process", **common, "seconds": round(plain["seconds"], 3),
                 "tokens_per_s": round(plain["tokens_per_s"]), "vs_plain": 1.0})  # fmt: skip
    return rows


def reading_section(ns, tokenizer, tokenizer_path: str, big: Path, run: Path) -> list[dict]:
    from lit_distill.data import StreamingTextDataModule, TextDataModule

    rows = []
    directory = run / "prepared-corpus"
    if not directory.exists():  # the memory measurement prepared it, unless it was left out
        prepare(big, tokenizer, directory)
    data = TextDataModule(prepared=str(directory), seq_len=SEQ_LEN, batch_size=BATCH_SIZE)
    start = time.perf_counter()
    loader = data.train_dataloader()  # sets up: checks the token files' sha256
    setup = time.perf_counter() - start
    rows.append({"source": "prepared (row by row)", "setup_s": round(setup, 2), **read_batches(loader, ns.batches)})
    start = time.perf_counter()
    streamed = StreamingTextDataModule(files=[str(big)], tokenizer=tokenizer_path, seq_len=SEQ_LEN,
                                       batch_size=BATCH_SIZE)  # fmt: skip
    # Without a trainer (rank 0 of 1, epoch 0, no batch done) the loader reads the epoch from its start; its first
    # batch waits for the shuffle buffer (1,024 rows) to fill.
    loader = streamed.train_dataloader()
    setup = time.perf_counter() - start
    rows.append({"source": "streamed jsonl", "setup_s": round(setup, 2), **read_batches(loader, ns.batches)})
    for row in rows:
        row["vs_demo_training"] = round(row["tokens_per_s"] / DEMO_SOFT_LABEL_TOKENS_PER_S, 1)
        for key in ("seconds", "first_batch_s"):
            row[key] = round(row[key], 3)
        row["rows_per_s"], row["tokens_per_s"] = round(row["rows_per_s"]), round(row["tokens_per_s"])
    return rows


def startup_section(env: dict, run: Path) -> list[dict]:
    env = {**env, "LIT_DISTILL_CACHE": str(run / "startup-cache"), "HF_HUB_OFFLINE": "1"}
    rows = []
    for number, name in enumerate(("first (prepares)", "second (reads)"), 1):
        r = fit_cli(run / f"startup-{number}", env)
        rows.append({"run": name, "first_step_s": round(r["first_step_s"], 2), "wall_s": round(r["wall_s"], 2),
                     "tokenized": "yes" if r["tokenized"] else "no"})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------ output
def table(rows: list[dict], title: str) -> None:
    """Print ``rows`` as an aligned table under ``title`` (numbers right-aligned, with thousands separators)."""

    def cell(v) -> str:
        return (
            f"{v:,}"
            if isinstance(v, int) and not isinstance(v, bool)
            else f"{v:,.2f}"
            if isinstance(v, float)
            else str(v)
        )

    columns = list(rows[0])
    text = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in text)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), (int, float)) for r in rows) for c in columns]

    def line(cells: list[str]) -> str:
        return "  ".join(s.rjust(w) if n else s.ljust(w) for s, w, n in zip(cells, widths, numeric, strict=True))

    print(f"\n## {title}\n{line(columns)}\n{'  '.join('-' * w for w in widths)}", flush=True)
    for t in text:
        print(line(t), flush=True)


def write_csv(rows: list[dict], out: Path, name: str, stamp: str, env: dict) -> Path:
    path = out / f"data_loading-{name}-{stamp}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *env])
        writer.writeheader()
        writer.writerows({**row, **env} for row in rows)
    return path


def _machine() -> dict:
    import torch

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return {"machine": f"{cpu} ({os.cpu_count()} CPUs)", "torch": torch.__version__,
            "date": datetime.date.today().isoformat()}  # fmt: skip


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.data_loading", description=__doc__.split("\n\n")[1])
    p.add_argument("--corpus-mb", type=float, default=1024, help="size of the large corpus in MiB")
    p.add_argument("--small-mb", type=float, default=10, help="size of the small corpus (the large one's start)")
    p.add_argument("--prepare-mb", type=float, default=200, help="the slice the preparing throughput is timed on"
                   " (0: the whole corpus)")  # fmt: skip
    p.add_argument("--batches", type=int, default=500, help="batches each loader is read for")
    p.add_argument("--steps", type=int, default=50, help="training steps of each memory run")
    p.add_argument("--sections", nargs="+", choices=["memory", "prepare", "reading", "startup"],
                   default=["memory", "prepare", "reading", "startup"])  # fmt: skip
    p.add_argument("--work", type=Path, default=None, help="where the corpora and the tokenizer go (kept; default:"
                   " a temporary folder, removed)")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("bench/out"), help="folder for the CSVs")
    p.add_argument("--quick", action="store_true", help="tiny sizes (corpora of 2 and 0.5 MiB, 20 batches,"
                   " 10 steps): a check that it runs, not a measurement")  # fmt: skip
    ns = p.parse_args(argv)
    if ns.quick:
        ns.corpus_mb, ns.small_mb, ns.prepare_mb, ns.batches, ns.steps = 2, 0.5, 1, 20, 10
    if not 0 < ns.small_mb < ns.corpus_mb:
        p.error(f"need 0 < --small-mb < --corpus-mb, got {ns.small_mb} and {ns.corpus_mb}")
    return ns


def main(argv: list[str] | None = None) -> None:
    ns = _parse(argv)
    keep = ns.work is not None
    ns.work = (ns.work or Path(tempfile.mkdtemp(prefix="lit-distill-data-bench-"))).resolve()
    ns.work.mkdir(parents=True, exist_ok=True)
    ns.out.mkdir(parents=True, exist_ok=True)
    run = Path(tempfile.mkdtemp(prefix="run-", dir=ns.work))
    # datasets' Arrow copies of the corpora go with the run: each run reads the jsonl cold, and leaves nothing behind
    os.environ["HF_DATASETS_CACHE"] = str(run / "hf-datasets")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if ns.quick:  # one thread each: two threads of torch on a busy 2-core machine make a step 10x slower
        env["OMP_NUM_THREADS"] = "1"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    machine, bars, written = _machine(), [], []
    print(f"# {machine['machine']}, torch {machine['torch']}, {machine['date']}; work {ns.work}", flush=True)

    def report(name: str, rows: list[dict]) -> list[dict]:
        table(rows, TITLES[name])
        written.append(write_csv(rows, ns.out, name, stamp, machine))
        return rows

    try:
        from lit_distill.data import load_tokenizer

        big = corpus(ns.work, ns.corpus_mb)
        small = corpus(ns.work, ns.small_mb, big)
        tokenizer_path = tokenizer_dir(ns.work, big)
        tokenizer = load_tokenizer(tokenizer_path)
        if "memory" in ns.sections:
            rows = report("memory", memory_section(ns, env, tokenizer, big, small, run))
            bars.append(memory_bar(rows))
        if "prepare" in ns.sections:
            report("prepare", prepare_section(ns, tokenizer, big, run))
        if "reading" in ns.sections:
            rows = report("reading", reading_section(ns, tokenizer, tokenizer_path, big, run))
            bars += [reading_bar(r) for r in rows]
        if "startup" in ns.sections:
            report("startup", startup_section(env, run))
    finally:
        shutil.rmtree(run, ignore_errors=True)
        if not keep:
            shutil.rmtree(ns.work, ignore_errors=True)
    print("", *bars, "wrote " + ", ".join(map(str, written)), sep="\n")


def memory_bar(rows: list[dict]) -> str:
    big, small = rows[0], rows[1]
    diff = big["peak_rss_MiB"] - small["peak_rss_MiB"]
    verdict = "PASS" if abs(diff) * MIB <= MEMORY_BAR_MB * 1e6 else "FAIL"
    return (
        f"memory: peak RSS on the {big['corpus_MiB']:,} MiB corpus minus on the {small['corpus_MiB']:,} MiB one:"
        f" {diff:+,.1f} MiB (bar: within {MEMORY_BAR_MB} MB): {verdict}"
    )


def reading_bar(row: dict) -> str:
    verdict = "PASS" if row["vs_demo_training"] >= READING_BAR else "FAIL"
    return (
        f"reading: {row['source']}: {row['tokens_per_s']:,} tokens/s, {row['vs_demo_training']}x the training speed"
        f" of {DEMO_SOFT_LABEL_TOKENS_PER_S:,} tokens/s ({DEMO_SOURCE}; bar: {READING_BAR}x): {verdict}"
    )


TITLES = {
    "memory": "memory: peak RSS of training processes (tiny Llama, fresh process each)",
    "prepare": "preparing: prepare_text (num_proc None and 2) against plain encoding of the same documents",
    "reading": f"reading: train_dataloader() alone, batches of {BATCH_SIZE} x {SEQ_LEN}",
    "startup": "start-up: lit-distill fit configs/teacher.yaml, 1 step, fresh LIT_DISTILL_CACHE (from launch)",
}


if __name__ == "__main__" and sys.argv[1:2] == ["--train-child"]:
    _train_child(json.loads(sys.argv[2]))
elif __name__ == "__main__":
    main()
