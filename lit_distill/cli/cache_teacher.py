"""``lit-distill cache-teacher``: write a teacher cache from the command line (LightningCLI, Trainer.predict).

    lit-distill cache-teacher --config configs/cache_teacher.yaml
    lit-distill cache-teacher --model.teacher.init_args.name_or_path artifacts/teacher --model.method sampled \\
        --cache_dir artifacts/teacher-cache --trainer.devices 2

``--model.*`` are :class:`~lit_distill.data.teacher_cache.TeacherSignal`'s options (teacher, method, k, samples,
temperature, seed), ``--data.*`` the :class:`~lit_distill.data.TextDataModule`'s (its training split is cached) or,
with ``--data lit_distill.data.ChatDataModule`` (a ``class_path`` in the config), the chat data's (its training
conversations are cached, the signal only at the positions that predict a learned token), ``--trainer.*``
Lightning's (several devices write their shards in parallel).
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
        # A `data:` section without class_path holds TextDataModule's arguments, as in `lit-distill fit`.
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA}})
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.special_tokens", "model.special_tokens", apply_on="instantiate")
        shorten_help(parser, lambda dest: dest.startswith("trainer."))

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as err:
            message = configuration_error(err)
            if message is None or debug_requested():
                raise
            self.parser.error(message, hint="set JSONARGPARSE_DEBUG=true to see the traceback")


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
    rank_zero_info(
        f"teacher cache {config.cache_dir}: {settings.sequences} sequences, {manifest.tokens:,} tokens{learned},"
        f" {settings.method} with {settings.k} slots at T={settings.temperature}, {len(manifest.shards)} shards,"
        f" {size / 2**20:.1f} MiB ({size / manifest.tokens:.0f} bytes per token)"
    )
    return manifest
