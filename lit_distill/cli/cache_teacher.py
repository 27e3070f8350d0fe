"""``lit-distill cache-teacher``: write a teacher cache from the command line (LightningCLI, Trainer.predict).

    lit-distill cache-teacher --config configs/cache_teacher.yaml
    lit-distill cache-teacher --model.teacher.init_args.name_or_path artifacts/teacher --model.method sampled \\
        --cache_dir artifacts/teacher-cache --trainer.devices 2

``--model.*`` are :class:`~lit_distill.data.teacher_cache.TeacherSignal`'s options (teacher, method, k, samples,
temperature, seed), ``--data.*`` the :class:`~lit_distill.data.TextDataModule`'s (its training split is cached) or,
with ``--data lit_distill.data.ChatDataModule`` (a ``class_path`` in the config), the chat data's (its training
conversations are cached, the signal only at the positions that predict a learned token), ``--trainer.*``
Lightning's (several devices write their shards in parallel).

Across tokenizers, ``--student_tokenizer NAME`` stores the signal in that student's ids: the data is read with the
student's tokenizer, ``--data.tokenizer`` is the teacher's (passed on as the data module's ``teacher_tokenizer``),
the teacher reads its own tokenization of every row, and its signal is binned into the student's vocabulary at
the positions where both have read the same bytes (``--data.teacher_tokenizer`` with ``--data.tokenizer`` set to
the student's does the same).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from .errors import configuration_error, debug_requested
from .lightning_cli import DEFAULT_DATA
from .parser import LitDistillParser, shorten_help

USAGE = "%(prog)s [-c CONFIG] --cache_dir DIR [--model.NAME VALUE] [--data.NAME VALUE] [--trainer.NAME VALUE]"
DESCRIPTION = (
    "Run a teacher over the data's training split and store its sparse signal (top-k or sampled tokens with"
    " their log-probabilities) in --cache_dir, for OfflineDistillation. A rerun resumes at the first"
    " unfinished shard; with --trainer.devices N each process writes its own shards."
)


class CacheTeacherCLI(LightningCLI):
    """LightningCLI for :class:`~lit_distill.data.teacher_cache.TeacherSignal` and the text data, no subcommand."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--cache_dir", type=str, required=True, help="the cache directory to write (or resume)")
        parser.add_argument("--shard_sequences", type=int, default=1024, help="sequences per shard file")
        parser.add_argument("--max_sequences", type=int | None, default=None, help="cache only the first ones")
        parser.add_argument(
            "--student_tokenizer",
            type=str | None,
            default=None,
            help="store the signal in this student tokenizer's ids (--data.tokenizer is then the teacher's)",
        )
        # A `data:` section without class_path holds TextDataModule's arguments, as in `lit-distill fit`.
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA}})
        # The teacher's vocabulary and special tokens: the data's teacher_tokenizer's where it has one.
        parser.link_arguments("data", "model.vocab_size", compute_fn=_teacher_vocab_size, apply_on="instantiate")
        parser.link_arguments("data", "model.special_tokens", compute_fn=_teacher_specials, apply_on="instantiate")
        shorten_help(parser, lambda dest: dest.startswith("trainer."))

    def before_instantiate_classes(self) -> None:
        student = self.config.get("student_tokenizer")
        if not student:
            return
        data = self.config.data
        init = data.get("init_args")
        if init is None or "teacher_tokenizer" not in init:
            self.parser.error(
                f"--student_tokenizer needs data that reads two tokenizers (a teacher_tokenizer argument);"
                f" {data.get('class_path')} has none"
            )
        if init.get("teacher_tokenizer"):
            self.parser.error(
                "--student_tokenizer makes --data.tokenizer the teacher's; give --data.teacher_tokenizer or"
                " --student_tokenizer, not both"
            )
        if not init.get("tokenizer"):
            self.parser.error("--student_tokenizer needs --data.tokenizer: the teacher's tokenizer")
        init.teacher_tokenizer, init.tokenizer = init.tokenizer, student

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            message = configuration_error(err)
            if message is None or debug_requested():
                raise
            self.parser.error(message, hint="set JSONARGPARSE_DEBUG=true to see the traceback")


def _teacher_tokenizer(data):
    return getattr(data, "teacher_tokenizer", None)


def _teacher_vocab_size(data) -> int:
    teacher = _teacher_tokenizer(data)
    return data.vocab_size if teacher is None else len(teacher)


def _teacher_specials(data) -> dict[str, int]:
    from ..data.tokenizers import special_token_ids

    teacher = _teacher_tokenizer(data)
    return data.special_tokens if teacher is None else special_token_ids(teacher)


def cache_teacher_main(argv: list[str]) -> Any:
    """Parse ``argv``, write the cache and print its summary; returns the manifest."""
    from lightning.pytorch import LightningDataModule

    from ..data.teacher_cache import TeacherSignal, cache_teacher

    # LightningCLI reads sys.argv when given no args (and warns when given both): hand it this command's.
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        cli = CacheTeacherCLI(
            TeacherSignal,
            LightningDataModule,
            subclass_mode_data=True,
            run=False,
            trainer_defaults={"use_distributed_sampler": False, "logger": False, "enable_model_summary": False},
            save_config_callback=None,
            parser_kwargs={"description": DESCRIPTION, "prog": "lit-distill cache-teacher", "usage": USAGE},
            parser_class=LitDistillParser,
            auto_configure_optimizers=False,
        )
    finally:
        sys.argv = saved
    config = cli.config
    manifest = cache_teacher(
        cli.model,
        cli.datamodule,
        config.cache_dir,
        shard_sequences=config.shard_sequences,
        max_sequences=config.max_sequences,
        trainer=cli.trainer,
    )
    settings = manifest.settings
    size = sum((Path(config.cache_dir) / shard["file"]).stat().st_size for shard in manifest.shards)
    learned = ""
    if settings.layout == "rows":  # chat data: the signal only where a token is learned
        learned = f", {manifest.signal_positions:,} learned ({size / max(manifest.signal_positions, 1):.0f} bytes each)"
    mapped = ""
    if manifest.cross_tokenizer:  # the signal only at the boundaries of the two tokenizations
        names = manifest.tokenizers
        share = manifest.mapped_positions / max(manifest.signal_positions, 1)
        mapped = (
            f"; in the ids of student tokenizer {names.get('student', '?')} from teacher tokenizer"
            f" {names.get('teacher', '?')}: {manifest.mapped_positions:,} positions carry a signal"
            f" ({share:.0%} of the {'learned' if learned else 'student'} positions)"
        )
    rank_zero_info(
        f"teacher cache {config.cache_dir}: {settings.sequences} sequences, {manifest.tokens:,} tokens{learned},"
        f" {settings.method} with {settings.k} slots at T={settings.temperature}, {len(manifest.shards)} shards,"
        f" {size / 2**20:.1f} MiB ({size / manifest.tokens:.0f} bytes per token){mapped}"
    )
    return manifest
