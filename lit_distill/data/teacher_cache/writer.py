"""Writing a teacher cache with ``Trainer.predict``: shard by shard, resumable, on any number of processes.

``cache_teacher(signal, data, cache_dir)`` (or lists of signals and directories: one teacher pass for several
caches) plans the shards (shard ``i`` holds training sequences ``[i * S, (i + 1) * S)``: text blocks, or chat
conversations with the signal only where a token is learned, ``rows.py``), skips those an earlier
run finished, gives process ``r`` of ``W`` the remaining shards ``i`` with ``i % W == r`` (``loader.py``) and
runs ``Trainer.predict``; :class:`TeacherCacheWriter` stores each shard when its last sequence arrives (written to a
temporary name, then renamed: a shard file is whole or absent), and process 0 writes ``manifest.json`` once
all are there. Memory stays at a shard or two.

Across tokenizers (a data module built with ``teacher_tokenizer=``: its ``tokenizer`` is the student's), the rows
are the student's and the teacher reads its own tokenization of them (the batch keys of issue 26); the signal is
binned into the student's vocabulary and stored at the student's boundary positions, empty slots elsewhere
(``CrossTokenizerPass``; the map and the teacher's tokenizer beside the cache: ``cross_tokenizer.py``). The
cache then reads like any other, in the student's ids.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from safetensors import safe_open
from safetensors.torch import save_file

from ..cross_tokenizer.vocab_map import VocabularyMap
from .cross_tokenizer import checked_vocabulary_map, cross_tokenizer_settings, save_cross_tokenizer, tokenizer_names
from .loader import ShardLoader, finished_shards
from .manifest import (
    FORMAT_VERSION,
    ID_DTYPE,
    LOGPROB_DTYPE,
    MANIFEST,
    ROWS_FORMAT_VERSION,
    TOKENIZER_DIR,
    VALIDATION,
    CacheManifest,
    CacheSettings,
    model_hash,
    read_settings,
    sha256_file,
    shard_name,
    tokenizer_hash,
    write_settings,
)
from .rows import kept_signal, rows_shard, validation_tensors
from .signal import CrossTokenizerPass, SharedTeacherPass, TeacherSignal


def cache_teacher(
    signal: TeacherSignal | Sequence[TeacherSignal],
    data,
    cache_dir: str | Path | Sequence[str | Path],
    *,
    shard_sequences: int = 1024,
    batch_size: int | None = None,
    max_sequences: int | None = None,
    trainer: pl.Trainer | None = None,
    vocabulary_map: VocabularyMap | None = None,
) -> CacheManifest | list[CacheManifest]:
    """Run the teacher over ``data``'s training split and write its sparse signal to ``cache_dir``.

    Args:
        signal: the teacher and how to draw its signal (method, k or samples, temperature, seed). A list of
            signals of one teacher (the same model object) writes one cache each, in ``cache_dir``'s
            directories, from one teacher forward per batch: the same files as caching each alone.
        data: a :class:`~lit_distill.data.TextDataModule` or :class:`~lit_distill.data.ChatDataModule` (its
            training sequences or conversations, in order, are cached, a chat row's signal only at the positions
            that predict a learned token; its validation rows and tokenizer are stored beside them).
        cache_dir: the cache directory (a list of them for a list of signals); a rerun of the same job
            resumes at the first unfinished shard.
        shard_sequences: sequences per shard file.
        batch_size: sequences per teacher forward (default: the data's batch size).
        max_sequences: cache only the first ones (None: all).
        trainer: runs the prediction (default: one device, no logger). It must be built with
            ``use_distributed_sampler=False``: each process reads its own shards.
        vocabulary_map: for ``data`` built with a ``teacher_tokenizer`` (its ``tokenizer`` is the student's): the
            map from the teacher's ids to the student's (default: ``build_vocabulary_map`` of the two, cached on
            disk). The teacher then runs on its own tokenization of the rows, and its signal is stored binned into
            the student's vocabulary at the positions where both sides have read the same bytes, empty slots
            elsewhere; the cache's ids are the student's (``OfflineDistillation`` trains the student on it).

    Returns:
        The manifest of the finished cache (also in ``cache_dir/manifest.json``); a list of them for a list.

    Raises:
        ValueError: when ``cache_dir`` holds an unfinished cache of other settings, on bad sizes, or for
            lists of signals and directories of different lengths, a directory named twice, or signals of
            different teachers; a ``vocabulary_map`` of other tokenizers than the data's, or without a
            ``teacher_tokenizer`` in ``data``.
    """
    several = not isinstance(signal, TeacherSignal)
    signals = list(signal) if several else [signal]
    directories = [Path(d) for d in ([cache_dir] if isinstance(cache_dir, str | os.PathLike) else cache_dir)]
    if len(directories) != len(signals) or not signals or len(set(directories)) < len(directories):
        raise ValueError(
            f"cache_teacher needs one distinct directory per signal, got {len(signals)} signal(s) and"
            f" {[str(d) for d in directories]}"
        )
    if shard_sequences < 1 or (max_sequences is not None and max_sequences < 1):
        raise ValueError(f"shard_sequences and max_sequences must be positive, got {shard_sequences}, {max_sequences}")
    vocabulary_map = checked_vocabulary_map(data, vocabulary_map, signals)
    if vocabulary_map is not None:
        predictor = CrossTokenizerPass(signals, vocabulary_map, several)
    else:
        predictor = SharedTeacherPass(signals) if several else signal
    data.setup()
    layout = _layout(data)
    rows = data.train_blocks if layout == "blocks" else data.train_rows
    if max_sequences is not None and max_sequences < len(rows):
        rows = rows[:max_sequences] if layout == "blocks" else rows.select(range(max_sequences))
    plans = [
        (d, _settings(s, data, rows, shard_sequences, layout, vocabulary_map))
        for s, d in zip(signals, directories, strict=True)
    ]
    for directory, settings in plans:  # every cache checked before any is touched
        _check_resumable(directory, settings)
    for directory, _ in plans:
        directory.mkdir(parents=True, exist_ok=True)
    trainer = trainer or pl.Trainer(
        accelerator="auto", devices=1, logger=False, use_distributed_sampler=False, enable_model_summary=False
    )
    if trainer.world_size > 1 and getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
        raise ValueError(
            "cache_teacher on several processes needs Trainer(use_distributed_sampler=False): each process reads"
            " its own shards, and Lightning's sampler would split them again"
        )
    if trainer.is_global_zero:
        for directory, settings in plans:
            write_settings(directory, settings)
            if layout == "blocks":
                held_out = {"input_ids": data.val_blocks.to(ID_DTYPE)}
            else:
                held_out = validation_tensors(data.val_set)
            save_file({k: v.contiguous() for k, v in held_out.items()}, directory / VALIDATION)
            data.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
            if vocabulary_map is not None:
                save_cross_tokenizer(directory, data, vocabulary_map)
    names = tokenizer_names(data, vocabulary_map)
    writers = [TeacherCacheWriter(d, s, key=i if several else None, tokenizers=names) for i, (d, s) in enumerate(plans)]
    if all(len(finished_shards(d, s)) == s.num_shards for d, s in plans):  # nothing left to predict
        for writer in writers:
            if trainer.is_global_zero and not (writer.directory / MANIFEST).exists():
                writer.write_manifest()
        trainer.strategy.barrier()
    else:
        trainer.callbacks.extend(writers)
        try:
            collate = data.train_dataloader().collate_fn if vocabulary_map is not None else None
            pad_id = getattr(data, "pad_id", None)
            loader = ShardLoader(rows, plans, batch_size or data.batch_size, pad_id, collate)
            trainer.predict(predictor, datamodule=loader, return_predictions=False)
        finally:
            for writer in writers:
                trainer.callbacks.remove(writer)
    manifests = [CacheManifest.read(d) for d in directories]
    return manifests if several else manifests[0]


def _layout(data) -> str:
    """The cache's layout for ``data``: "rows" for chat data (conversations of any length), "blocks" for text."""
    if getattr(data, "train_rows", None) is not None:
        return "rows"
    if getattr(data, "train_blocks", None) is not None:
        return "blocks"
    raise TypeError(
        f"cache_teacher reads a TextDataModule or a ChatDataModule (or a data module with train_blocks, or"
        f" train_rows), got {type(data).__name__}"
    )


def _settings(
    signal: TeacherSignal, data, rows, shard_sequences: int, layout: str, vocabulary_map: VocabularyMap | None = None
) -> CacheSettings:
    return CacheSettings(
        teacher_source=str(signal.source),
        teacher_hash=model_hash(signal.teacher),
        tokenizer_hash=tokenizer_hash(data.tokenizer),
        vocab_size=data.vocab_size,
        method=signal.method,
        k=signal.slots,
        samples=signal.samples if signal.method == "sampled" else 0,
        temperature=float(signal.temperature),
        seq_len=rows.shape[1] if layout == "blocks" else data.max_seq_length,
        sequences=len(rows),
        shard_sequences=shard_sequences,
        seed=signal.seed,
        layout=layout,
        format_version=ROWS_FORMAT_VERSION if layout == "rows" else FORMAT_VERSION,
        data_fingerprint=rows._fingerprint if layout == "rows" else getattr(data, "fingerprint", ""),
        **cross_tokenizer_settings(vocabulary_map),
    )


def _check_resumable(directory: Path, settings: CacheSettings) -> None:
    existing = read_settings(directory)
    if existing is None or existing == settings:
        return
    different = [name for name in vars(settings) if getattr(existing, name) != getattr(settings, name)]
    raise ValueError(
        f"{directory} holds a teacher cache of other settings ({', '.join(different)} differ); use another"
        " directory or delete it"
    )


def _blocks_shard(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The tensors of a text shard: ``(S, L)`` ids and ``(S, L, K)`` signal of its sequences, in order."""
    return {
        "input_ids": torch.stack([r["input_ids"] for r in rows]).to(ID_DTYPE),
        "teacher_ids": torch.stack([r["teacher_ids"] for r in rows]).to(ID_DTYPE),
        "teacher_logprobs": torch.stack([r["teacher_logprobs"] for r in rows]).to(LOGPROB_DTYPE),
    }


class TeacherCacheWriter(BasePredictionWriter):
    """Collects ``TeacherSignal`` predictions per shard and writes each shard when it is complete; process 0
    then writes the manifest with a sha256 per shard. ``key`` picks this cache's prediction from a
    ``SharedTeacherPass``'s list; a shard already in ``directory`` is left as it is."""

    def __init__(
        self,
        directory: str | Path,
        settings: CacheSettings,
        key: int | None = None,
        tokenizers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(write_interval="batch")
        self.directory, self.settings, self.key = Path(directory), settings, key
        self.tokenizers = dict(tokenizers or {})  # the manifest's names of the two tokenizers, across tokenizers
        self.pending: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # shard -> sequence -> its signal

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        prediction = prediction if self.key is None else prediction[self.key]
        for row, index in enumerate(prediction["index"].tolist()):
            shard = index // self.settings.shard_sequences
            if self.settings.layout == "rows":  # kept at once: a shard of whole rows' signals would not fit
                kept = kept_signal(prediction, batch, row)
            else:
                kept = {name: prediction[name][row].cpu() for name in ("input_ids", "teacher_ids", "teacher_logprobs")}
            self.pending.setdefault(shard, {})[index] = kept
            start, stop = self.settings.shard_range(shard)
            if len(self.pending[shard]) == stop - start:
                rows = self.pending.pop(shard)
                if not (self.directory / shard_name(shard)).exists():  # another cache of the pass lacked it
                    self._write_shard(shard, rows)

    def _write_shard(self, shard: int, rows: dict[int, dict[str, torch.Tensor]]) -> None:
        ordered = [rows[i] for i in sorted(rows)]
        tensors = rows_shard(ordered) if self.settings.layout == "rows" else _blocks_shard(ordered)
        path = self.directory / shard_name(shard)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"first_sequence": str(min(rows))})
        os.replace(tmp, path)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.pending:  # the loader hands out whole shards, so this is a bug, not bad input
            raise RuntimeError(f"teacher cache: shards {sorted(self.pending)} were left incomplete")
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            self.write_manifest()
        trainer.strategy.barrier()

    def write_manifest(self) -> CacheManifest:
        settings = self.settings
        missing = [i for i in range(settings.num_shards) if not (self.directory / shard_name(i)).exists()]
        if missing:
            raise RuntimeError(f"teacher cache {self.directory}: shards {missing[:5]} were not written")
        shards, tokens, positions, mapped = [], 0, 0, 0
        cross = bool(settings.teacher_tokenizer_hash)
        for i in range(settings.num_shards):
            start, stop = settings.shard_range(i)
            path = self.directory / shard_name(i)
            shards.append({"file": path.name, "sequences": stop - start, "sha256": sha256_file(path)})
            if settings.layout == "rows" or cross:
                with safe_open(path, "pt") as f:
                    if settings.layout == "rows":
                        tokens += int(f.get_tensor("lengths").sum())
                        positions += int(f.get_tensor("signals").sum())
                    if cross:  # the positions that carry a signal: the boundaries (a first slot that is not empty)
                        mapped += int((f.get_tensor("teacher_ids")[..., 0] >= 0).sum())
        if settings.layout == "blocks":
            tokens = positions = settings.sequences * settings.seq_len
        with safe_open(self.directory / VALIDATION, "pt") as f:
            validation = f.get_slice("lengths" if settings.layout == "rows" else "input_ids").get_shape()[0]
        mapped = mapped if cross else positions
        manifest = CacheManifest(settings, tokens, shards, validation, positions, mapped, self.tokenizers)
        manifest.write(self.directory)
        return manifest
