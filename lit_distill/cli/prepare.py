"""``lit-distill prepare``: tokenize a corpus (or chat data) once into a prepared directory.

    lit-distill prepare --data.files '[corpus.jsonl]' --data.tokenizer artifacts/teacher --data.seq_len 2048 \\
        --data.num_proc 8 --output prepared/corpus
    lit-distill prepare --config prepare.yaml    # a YAML file of data: (with its class_path) and output:

``--data.*`` are :class:`~lit_distill.data.TextDataModule`'s options (the default) or, with ``--data
lit_distill.data.ChatDataModule`` (a ``class_path`` in the config), the chat data's. Training then reads the
directory row by row: ``--data.prepared DIR`` on ``lit-distill fit``. ``TextDataModule`` also prepares by
itself into its cache directory; this command is for corpora prepared ahead of time, once, for many runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile
from lightning.pytorch import LightningDataModule

from .errors import configuration_error, debug_requested
from .lightning_cli import DEFAULT_DATA
from .parser import LitDistillParser

DESCRIPTION = (
    "Tokenize the data's corpus (TextDataModule: packed rows of seq_len; ChatDataModule: conversations with their"
    " label masks) once into --output, with a metadata file that training checks. Train on it with"
    " `lit-distill fit ... --data.prepared DIR`. The data's options: --data.help TextDataModule (or"
    " ChatDataModule)."
)


def prepare_parser() -> LitDistillParser:
    parser = LitDistillParser(prog="lit-distill prepare", description=DESCRIPTION)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML file of these options")
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True, required=False)
    parser.set_defaults({"data": {"class_path": DEFAULT_DATA}})
    parser.add_argument("--output", type=str, required=True, help="the prepared directory to write (must not exist)")
    return parser


def prepare_main(argv: list[str]) -> dict[str, Any]:
    """Parse ``argv``, prepare the data into ``--output`` and print what was written; returns the metadata."""
    parser = prepare_parser()
    config = parser.parse_args(argv)
    try:
        data = parser.instantiate_classes(config).data
    except Exception as err:
        message = configuration_error(err)
        if message is None or debug_requested():
            raise
        parser.error(message, hint="set JSONARGPARSE_DEBUG=true to see the traceback")
    return prepare(data, config.output)


def prepare(data: LightningDataModule, output: str | Path) -> dict[str, Any]:
    """Prepare ``data`` (a ``TextDataModule`` or ``ChatDataModule``) into ``output``; print and return the metadata."""
    from dataclasses import asdict

    from ..data import ChatDataModule, TextDataModule
    from ..data.prepared import prepare_text
    from ..data.prepared_chat import prepare_chat

    start = time.perf_counter()
    if isinstance(data, TextDataModule):
        options = {"seq_len": data.seq_len, "val_fraction": data.val_fraction, "text_field": data.text_field}
        meta = asdict(prepare_text(data.files, data.tokenizer, output, **options, num_proc=data.num_proc))
        counts = ", ".join(
            f"{split}: {meta['documents'][split]:,} documents, {n:,} tokens" for split, n in meta["tokens"].items()
        )
    elif isinstance(data, ChatDataModule):
        meta = prepare_chat(data, output)
        counts = "; ".join(
            f"{split}: " + ", ".join(f"{v:,} {k}" for k, v in c.items()) for split, c in meta["summary"].items()
        )
    else:
        raise TypeError(f"lit-distill prepare reads a TextDataModule or a ChatDataModule, got {type(data).__name__}")
    size = sum(f.stat().st_size for f in Path(output).rglob("*") if f.is_file())
    print(
        f"prepared {output} in {time.perf_counter() - start:.1f} s ({size / 2**20:.1f} MiB): {counts}."
        f" Train on it with --data.prepared {output}"
    )
    return meta
