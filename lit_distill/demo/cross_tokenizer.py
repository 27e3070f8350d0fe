"""The demo's students with their own tokenizer: the same size as the others, but a SentencePiece-style BPE of 2048
tokens with byte fallback (``student_tokenizer.py``) where the teacher has its byte-level BPE of 4096.

- ``own-tokenizer alone``: plain cross-entropy on its own tokenization of the training split (the baseline);
- ``cross-tokenizer``: learns from the demo's teacher across the tokenizers (``CrossTokenizerDistillation``: the
  teacher's distribution binned into the student's vocabulary at the positions where both have read the same
  bytes, the student's labels between them; ``CROSS`` below).

Their val loss is per token of their own tokenizer; the table's ``bits/byte`` column compares them with the others.
"""

from __future__ import annotations

from pathlib import Path

from .report import OTHER_TOKENIZER
from .student_tokenizer import STUDENT_VOCAB, train_metaspace_bpe

OTHER_TOKENIZER_TECHNIQUES = OTHER_TOKENIZER  # the report's names of them
#: validation batches over which the share of boundaries is counted
BOUNDARY_BATCHES = 16
#: the cross-tokenizer student's loss: T=1 and alpha 0.7, the teacher's whole distribution binned (top_k None: the
#: student's vocabulary is small), no chunk term. On student seed 1 (bits per byte; docs/experiments.md): alpha 0.5
#: 2.3808, 0.7 2.3711, 0.8 2.3753, 0.9 2.3925; T=2 2.3904 (alpha 0.5); top-64 2.3900 (alpha 0.5); the chunk and
#: ULD terms: the table in docs/experiments.md
CROSS = {"loss": {"temperature": 1.0, "alpha": 0.7}, "options": {"top_k": None, "chunk_weight": 0.0}}


def student_data(data, sizes: dict, cache: Path, teacher_tokenizer=None):
    """The bundled corpus in the student's tokenizer (trained on ``data``'s training split and cached), as ``data``
    cuts it; with ``teacher_tokenizer``, each batch also carries the teacher's tokenization and the alignment."""
    from ..data import TextDataModule

    directory = train_metaspace_bpe(data.train_documents, STUDENT_VOCAB, cache)
    extra = {} if teacher_tokenizer is None else {"teacher_tokenizer": teacher_tokenizer}
    return TextDataModule(
        tokenizer=str(directory),
        seq_len=sizes["seq_len"],
        batch_size=sizes["batch_size"],
        cache_dir=str(cache),
        max_train_tokens=sizes["max_train_tokens"],
        **extra,
    )


def overlap_note(data, sizes: dict, cache: Path) -> str:
    """A line on the vocabulary map from the teacher's tokenizer (``data``'s) to the student's: the teacher's
    tokens that map exactly."""
    from ..data.cross_tokenizer import build_vocabulary_map

    student = student_data(data, sizes, cache).tokenizer
    report = build_vocabulary_map(data.tokenizer, student, cache_dir=cache).report()
    return (
        f"vocabulary map: {report['exact']:,} of the teacher's {report['teacher_tokens']:,} tokens have the same"
        f" bytes in the student's {report['student_tokens']:,} ({report['exact_share']:.1%}); the other"
        f" {report['binned']:,} are binned with their first student token"
    )


def boundary_note(data, sizes: dict, cache: Path, batches: int = BOUNDARY_BATCHES) -> str:
    """A line on the alignment: the share of the student's counted positions on the held-out works that are
    boundaries (both models have read the same bytes there), over the first ``batches`` validation batches."""
    cross = student_data(data, sizes, cache, teacher_tokenizer=data.tokenizer)
    pairs = counted = 0
    for index, batch in enumerate(cross.val_dataloader()):
        if index == batches:
            break
        pairs += int((batch["boundary_student"] >= 0).sum())
        counted += (
            int((batch["labels"][:, 1:] != -100).sum()) if "labels" in batch else batch["input_ids"][:, 1:].numel()
        )
    share = pairs / max(1, counted)
    return (
        f"alignment: {share:.1%} of the student's held-out positions are boundaries (both models have read the same"
        f" bytes: the teacher's distribution is binned there), {1 - share:.1%} lie inside chunks"
    )


def train_other_tokenizer_student(technique: str, teacher, data, sizes: dict, ns, out: Path, cache: Path):
    """Train one student of ``OTHER_TOKENIZER_TECHNIQUES``; its row of the table and its validation curve (CE per
    token of its own tokenizer)."""
    import lightning.pytorch as pl

    from .training import CHUNK_TOKENS, _llama, _optimizer, fit_student, student_seed

    seed = student_seed(ns)
    own = student_data(data, sizes, cache)
    train_data = own
    pl.seed_everything(seed, verbose=False)  # both start from the same weights and data order
    spec = _llama(sizes, "student", own)  # its vocabulary and special tokens
    optimizer = _optimizer(3e-3)
    if technique == "own-tokenizer alone":
        from ..modules import LanguageModelTraining

        module = LanguageModelTraining(spec, optimizer=optimizer)
    elif technique == "cross-tokenizer":
        from ..losses import DistillationLoss
        from ..modules import CrossTokenizerDistillation

        train_data = student_data(data, sizes, cache, teacher_tokenizer=data.tokenizer)
        module = CrossTokenizerDistillation(
            spec, teacher, own.tokenizer, data.tokenizer, loss=DistillationLoss(**CROSS["loss"]),
            **CROSS["options"], optimizer=optimizer, chunk_size=CHUNK_TOKENS, cache_dir=str(cache),
        )  # fmt: skip
    else:
        raise ValueError(f"unknown technique {technique!r}; choose from {OTHER_TOKENIZER_TECHNIQUES}")
    row, curve = fit_student(technique, module, train_data, own, [], sizes, out, teacher=None, seed=seed)
    return row, curve
