"""The demo's offline students: the teacher's signal cached once (top-k with a tail bucket, and sampled), then
students trained from the caches with no teacher in memory."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

#: technique: (cache method, slots of the 4096 tokens, the loss's tail bucket, temperature, alpha). The sampled
#: cache is at the online soft-label student's T=2 and alpha. The demo's teacher is flat: its top 32 tokens
#: hold 15% of its mass at T=2 and 58% at T=1, but 93% at T=0.5, where a bucket for the rest loses little. At
#: T=0.5 the T² factor weighs the soft term down to a quarter, so the student's cross-entropy on the data
#: takes less of the loss (alpha 0.8). docs/experiments.md, for the sweep that chose them.
OFFLINE = {"offline top-k": ("topk", 32, True, 0.5, 0.8), "offline sampled": ("sampled", 32, False, 2.0, 0.5)}


def write_caches(
    teacher, data, sizes: dict, ns, cache: Path, techniques=tuple(OFFLINE)
) -> tuple[dict[str, Path], list[str]]:
    """Write (or reuse) the teacher cache of each offline technique of ``techniques``, the missing ones in one
    teacher pass; their directories and a line on each cache.

    Only as many training sequences as a student reads (steps x batch size) are cached: the students train
    within one pass over them, so caching the whole split would cost time and show nothing more.
    """
    from ..data.teacher_cache import TeacherSignal, cache_teacher
    from ..reporting import quiet

    sequences = sizes["student_steps"] * sizes["batch_size"]
    teacher_key = teacher.name_or_path  # its cache directory, named by its config, sizes, seed and tokenizer
    directories, missing = {}, {}
    for technique in techniques:
        method, slots, _, temperature, _ = OFFLINE[technique]
        key = hashlib.sha1(f"{teacher_key}{method}{slots}{temperature}{sequences}".encode()).hexdigest()[:12]
        directories[technique] = directory = cache / "demo" / f"teacher-cache-{method}-{key}"
        reused = (directory / "manifest.json").exists()
        what = f"teacher cache ({method}, {slots} slots, T={temperature:g})"
        print(f"{what}: {'reusing' if reused else 'writing'} {directory}")
        if not reused:
            missing[technique] = TeacherSignal(
                teacher, method=method, k=slots, samples=slots, temperature=temperature, seed=ns.seed
            )
    start = time.perf_counter()
    if missing:
        quiet()
        signals, targets = list(missing.values()), [directories[t] for t in missing]
        cache_teacher(signals, data, targets, max_sequences=sequences, batch_size=64, trainer=_predictor())
    seconds = time.perf_counter() - start
    tokens = sequences * sizes["seq_len"]
    notes = []
    for technique, directory in directories.items():
        size = sum(p.stat().st_size for p in directory.glob("shard-*.safetensors"))
        what = "reused"
        if technique in missing:
            shared = f", one teacher pass for {len(missing)} caches" if len(missing) > 1 else ""
            what = f"written in {seconds:.1f} s ({tokens / seconds:,.0f} tokens/s{shared})"
        method = OFFLINE[technique][0]
        notes.append(
            f"cache {method}: {tokens:,} tokens, {size / 2**20:.1f} MiB ({size / tokens:.0f} bytes/token), {what}"
        )
    return directories, notes


def _predictor():
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )


def offline_module(technique: str, spec, directory: Path, sizes: dict, options: dict):
    """The student's module and its data for an offline technique; ``options`` go to the module."""
    from ..data.teacher_cache import TeacherCacheDataModule
    from ..losses import DistillationLoss
    from ..modules import OfflineDistillation

    _, _, tail, temperature, alpha = OFFLINE[technique]
    loss = DistillationLoss(temperature=temperature, alpha=alpha)
    module = OfflineDistillation(spec, loss=loss, tail=tail, **options)
    return module, TeacherCacheDataModule(str(directory), batch_size=sizes["batch_size"])
