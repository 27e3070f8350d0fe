"""Cross-tokenizer distillation on the CPU: ``python -m bench.cross_tokenizer --help``.

On the bundled corpus's training works, with the demo's two tokenizers (the teacher's byte-level BPE of 4,096 tokens
and the student's Metaspace BPE with byte fallback of 2,048; ``--quick``: 1,024 and 512 on a slice), at the demo's
shape (``--rows`` rows of ``--seq-len`` student tokens):

- collator: sequences per second of ``CrossTokenizerCollator`` (the teacher's tokens of each row, the byte
  alignment, pairs and chunks) in one process, against the sequences per second of the demo's cross-tokenizer
  training step (the teacher's forward, the student's forward and backward, the loss, an AdamW step). Bar: the
  collator is faster than the step, so that one loader worker keeps up;
- loss: forward and backward of the loss alone, on logits, against soft-label distillation with one tokenizer
  (``distillation_loss``, forward KL at T=2, alpha 0.5, on the teacher's 4,096-token rows of the same text), for
  the sparse boundary term (``top_k=64``), with the chunk and ULD terms, and dense (``top_k=None``). Bar: at most
  1.5x soft-label's time. Then the top-64 loss from the student's hidden states and head, as the module's
  training step computes it: with the logits whole, and on the fused-linear path (1024 tokens a chunk).

Times are the median of ``--reps`` runs after one warm-up. Prints a table and writes ``cross_tokenizer.csv`` to
``--out``.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

SIZES = {
    "default": {"teacher_vocab": 4096, "student_vocab": 2048, "teacher_hidden": 192, "teacher_layers": 4,
                "student_hidden": 96, "student_layers": 2, "characters": None},
    "quick": {"teacher_vocab": 1024, "student_vocab": 512, "teacher_hidden": 64, "teacher_layers": 1,
              "student_hidden": 32, "student_layers": 1, "characters": 300_000},
}  # fmt: skip
LOSSES = {  # name -> the cross-tokenizer loss's options (None: soft-label with one tokenizer, the reference)
    "soft-label (one tokenizer)": None,
    "cross: boundary top-64": {"top_k": 64},
    "cross: boundary top-64 + chunk + ULD": {"top_k": 64, "chunk_weight": 0.5, "uld_weight": 0.5},
    "cross: boundary dense (the demo's)": {"top_k": None},
    "cross: dense + chunk 2": {"top_k": None, "chunk_weight": 2.0},
}


def _timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _setup(sizes: dict, seq_len: int, rows: int, work: Path):
    from transformers import PreTrainedTokenizerFast

    from lit_distill.data.corpus import read_documents, split_documents
    from lit_distill.data.cross_tokenizer import CrossTokenizerCollator
    from lit_distill.data.tokenizers import train_bpe
    from lit_distill.demo.student_tokenizer import train_metaspace_bpe

    train, _ = split_documents(read_documents(None), 0.05)
    if sizes["characters"]:
        train = [d[: sizes["characters"] // len(train)] for d in train]
    teacher = train_bpe(train, sizes["teacher_vocab"], work)
    student = PreTrainedTokenizerFast.from_pretrained(train_metaspace_bpe(train, sizes["student_vocab"], work))
    ids = torch.tensor(student("".join(train[:3])).input_ids[: rows * 50 * seq_len])
    samples = [{"input_ids": row} for row in ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)]
    return teacher, student, CrossTokenizerCollator(student, teacher), samples


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.cross_tokenizer", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a check that it runs")
    parser.add_argument("--work", default="bench/out/cross-tokenizer-work")
    parser.add_argument("--out", default="bench/out")
    ns = parser.parse_args(argv)
    from lit_distill import distillation_loss
    from lit_distill.data.cross_tokenizer.fused import fused_cross_tokenizer_loss
    from lit_distill.data.cross_tokenizer.loss import Pairs, cross_tokenizer_loss
    from lit_distill.losses import DistillationLoss
    from lit_distill.models import CausalLM
    from lit_distill.modules import CrossTokenizerDistillation

    sizes = SIZES["quick" if ns.quick else "default"]
    work, out = Path(ns.work), Path(ns.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    teacher_tok, student_tok, collate, samples = _setup(sizes, ns.seq_len, ns.rows, work)
    batches = [samples[i : i + ns.rows] for i in range(0, len(samples) - ns.rows + 1, ns.rows)]
    results = []

    start = time.perf_counter()
    collated = [collate(b) for b in batches]
    seconds = time.perf_counter() - start
    results.append(
        {
            "what": "collator",
            "seconds": seconds / len(batches),
            "sequences_per_s": len(samples[: len(batches) * ns.rows]) / seconds,
        }
    )

    def llama(hidden, layers, vocab):
        config = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": hidden * 8 // 3,
                  "num_hidden_layers": layers, "num_attention_heads": hidden // 32, "vocab_size": vocab,
                  "max_position_embeddings": 2 * ns.seq_len, "tie_word_embeddings": True}  # fmt: skip
        return CausalLM(config=config)

    module = CrossTokenizerDistillation(
        llama(sizes["student_hidden"], sizes["student_layers"], len(student_tok)),
        llama(sizes["teacher_hidden"], sizes["teacher_layers"], len(teacher_tok)),
        student_tok, teacher_tok, loss=DistillationLoss(temperature=2.0, alpha=0.5), cache_dir=str(work),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(module.student.parameters(), lr=1e-3)
    batch = collated[0]

    def step():
        optimizer.zero_grad()
        module.compute_loss(batch).loss.backward()
        optimizer.step()

    seconds = _timed(step, ns.reps)
    results.append({"what": "training step", "seconds": seconds, "sequences_per_s": ns.rows / seconds})
    share = float((batch["boundary_student"] >= 0).sum() / (batch["labels"][:, 1:] != -100).sum())

    g = torch.Generator().manual_seed(0)
    t_len = batch["teacher_input_ids"].shape[1]
    student_logits = torch.randn(ns.rows, ns.seq_len - 1, len(student_tok), generator=g).requires_grad_()
    teacher_logits = torch.randn(ns.rows, t_len, len(teacher_tok), generator=g)
    same_student = torch.randn(ns.rows, t_len, len(teacher_tok), generator=g).requires_grad_()
    labels = batch["input_ids"][:, 1:]
    teacher_targets = torch.nn.functional.pad(batch["teacher_input_ids"][:, 1:], (0, 1))
    teacher_labels = teacher_targets.masked_fill(batch["teacher_attention_mask"] == 0, -100)
    pairs = Pairs.of(batch)
    for name, options in LOSSES.items():
        if options is None:
            run = lambda: distillation_loss(  # noqa: E731
                same_student, teacher_logits, teacher_labels, temperature=2.0, alpha=0.5
            ).loss.backward()
        else:
            run = lambda options=options: cross_tokenizer_loss(  # noqa: E731
                student_logits, teacher_logits, labels, teacher_targets, pairs, module.vocab_map, temperature=2.0,
                alpha=0.5, reduction="mean", teacher_ce=False, **options,
            ).loss.backward()  # fmt: skip
        results.append({"what": f"loss: {name}", "seconds": _timed(run, ns.reps), "sequences_per_s": None})
    # from the student's hidden states and head (the module's training step): the logits whole, or fused
    hidden = torch.randn(ns.rows, ns.seq_len - 1, sizes["student_hidden"], generator=g).requires_grad_()
    head = torch.nn.Linear(sizes["student_hidden"], len(student_tok), bias=False)
    keywords = dict(temperature=2.0, alpha=0.5, byte_lengths=module.token_byte_lengths(labels.device))
    paths = {
        "cross: top-64 from hidden, logits whole": lambda: cross_tokenizer_loss(
            head(hidden), teacher_logits, labels, teacher_targets, pairs, module.vocab_map, top_k=64,
            reduction="sum", teacher_ce=False, **keywords,
        ).loss.backward(),
        "cross: top-64 from hidden, fused linear": lambda: fused_cross_tokenizer_loss(
            hidden, head.weight, None, teacher_logits, labels, teacher_targets, pairs, module.vocab_map, top_k=64,
            chunk_size=1024, **keywords,
        ).loss.backward(),
    }  # fmt: skip
    for name, run in paths.items():
        results.append({"what": f"loss: {name}", "seconds": _timed(run, ns.reps), "sequences_per_s": None})
    reference = results[2]["seconds"]
    for row in results[2:]:
        row["vs_soft_label"] = row["seconds"] / reference
    results[0]["vs_step"] = results[0]["sequences_per_s"] / results[1]["sequences_per_s"]

    print(f"cross-tokenizer bench: {ns.rows} rows x {ns.seq_len} student tokens, {len(student_tok)}-token student,"
          f" {len(teacher_tok)}-token teacher, boundary share {share:.2f}")  # fmt: skip
    print(f"{'what':46s} {'ms':>9s} {'seq/s':>9s} {'ratio':>7s}")
    for row in results:
        ratio = row.get("vs_soft_label", row.get("vs_step"))
        seq = f"{row['sequences_per_s']:9.0f}" if row["sequences_per_s"] else " " * 9
        shown = "" if ratio is None else f"{ratio:7.2f}"
        print(f"{row['what']:46s} {row['seconds'] * 1e3:9.1f} {seq} {shown}")
    with open(out / "cross_tokenizer.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["what", "seconds", "sequences_per_s", "vs_step", "vs_soft_label"])
        writer.writeheader()
        writer.writerows(results)
    return results


if __name__ == "__main__":
    main()
