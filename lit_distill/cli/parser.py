"""The parser of ``lit-distill``: no abbreviated options, trimmed help and errors in one message (status 2).

LightningCLI's help lists Lightning's flags with their whole documentation and every subclass of
``torch.nn.Module`` a model argument accepts, but not the options of the techniques a ``--model`` can name; the
parser here keeps each flag's first sentence, drops the long subclass lists and adds every technique's and the
loss's options to ``fit --help``. The technique listing builds parsers of this class, so both live in one file.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser

from .errors import concise_error, debug_requested

SUBCOMMANDS = ("fit", "validate", "test", "predict")
# Shown with a technique's options and never set by hand: the command line links them from the data.
LINKED = {"vocab_size": "data.vocab_size", "special_tokens": "data.special_tokens"}
# Longer lists of known subclasses (every torch.nn.Module for a model argument) are left out of the help.
MAX_LISTED_SUBCLASSES = 12


class LitDistillHelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help, without lists of more than ``MAX_LISTED_SUBCLASSES`` known subclasses."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = super()._get_help_string(action)
        head, found, tail = text.partition(", known subclasses: ")
        if found and tail.count(",") >= MAX_LISTED_SUBCLASSES:
            text = head + ")"
        return text


class LitDistillParser(LightningArgumentParser):
    """Lightning's parser: no abbreviated options, shorter help, errors in one message (exit status 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --trainer.max_step must not run as --trainer.max_steps
        kwargs.setdefault("formatter_class", LitDistillHelpFormatter)
        super().__init__(*args, **kwargs)

    def format_help(self, *args: Any, **kwargs: Any) -> str:
        text = super().format_help(*args, **kwargs)
        if getattr(self, "subcommand", None) in SUBCOMMANDS:
            text += techniques_help()
        return text

    def error(self, message: str, ex: Exception | None = None, hint: str | None = None) -> Any:
        if not self.exit_on_error or debug_requested():
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        text = concise_error(message)
        unknown = re.match(r"unrecognized arguments: (\S+)", text)
        if unknown:
            options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(unknown.group(1).split("=")[0], options, n=3, cutoff=0.75)
            text += f" (did you mean {' or '.join(close)}?)" if close else ""
        required = re.match(r"the following arguments are required: (.+)", text)
        if required:  # "fit.model": the option --model of lit-distill fit
            names = [name.strip() for name in required.group(1).split(",")]
            subcommand = names[0].split(".")[0]
            if subcommand in SUBCOMMANDS and all(name.startswith(f"{subcommand}.") for name in names):
                options = ", ".join(f"--{name.split('.', 1)[1]}" for name in names)
                text = f"{options} required (a --config sets it: lit-distill {subcommand} --config configs/<x>.yaml)"
                prog = f"{prog} {subcommand}"
        hint = hint or f"`{prog} --help` lists the options"
        sys.stderr.write(f"{prog}: error: {text}\n  ({hint})\n")
        self.exit(2)


def shorten_help(parser: LightningArgumentParser, which) -> None:
    """Cut the help of ``parser``'s options whose destination ``which`` accepts to its first sentence."""
    for action in parser._actions:
        if which(action.dest) and isinstance(action.help, str):
            action.help = first_sentence(action.help)


def first_sentence(text: str) -> str:
    """The first sentence of a help text (up to a period followed by a capital letter or a backquote)."""
    return re.split(r"(?<=\.)\s+(?=[A-Z`(])", text.strip(), maxsplit=1)[0]


def techniques_help() -> str:
    """The technique and loss options, for ``lit-distill fit --help``: each technique's own options, those
    every technique shares, and the loss's, each as the full option to type."""
    from ..losses import DistillationLoss
    from ..modules import (
        CoDistillation,
        DistillationModule,
        HardLabelDistillation,
        LanguageModelTraining,
        OfflineDistillation,
        OnPolicyDistillation,
        SoftLabelDistillation,
    )

    shared = _class_help(DistillationModule, "model.init_args", skip={"loss", *LINKED})
    shared_names = set(re.findall(r"^  --model\.init_args\.(\w+)", shared, flags=re.MULTILINE)) | {"loss", *LINKED}
    parts = [
        "\nTechniques: --model CLASS (model: class_path: in a config), then --model.init_args.NAME VALUE.\n"
        "A dotted NAME reaches inside a nested class, as --model.init_args.loss.init_args.temperature 4 does."
    ]
    for cls in (
        SoftLabelDistillation,
        HardLabelDistillation,
        CoDistillation,
        OnPolicyDistillation,
        OfflineDistillation,
        LanguageModelTraining,
    ):
        own = _class_help(cls, "model.init_args", skip=shared_names)
        summary = first_sentence((cls.__doc__ or "").strip().splitlines()[0]).rstrip(".")
        parts.append(f"\n{cls.__name__} ({cls.__module__.rsplit('.', 1)[0]}): {summary}.")
        parts.append(_options(own) or "  (the shared options only)")
    parts.append(
        f"\nShared by every technique (LanguageModelTraining has no teacher, fused_linear or chunk_size;"
        f" {', '.join(LINKED)} are linked from the data):"
    )
    parts.append(_options(shared))
    loss = _class_help(DistillationLoss, "model.init_args.loss.init_args")
    parts.append(
        "\nThe loss, model.init_args.loss (class lit_distill.losses.DistillationLoss, the default):\n" + _options(loss)
    )
    parts.extend(_data_help())
    return "\n".join(parts) + "\n"


def _data_help() -> list[str]:
    """The data's options: TextDataModule's in full (the default), TeacherCacheDataModule's by name."""
    import inspect

    from ..data import TeacherCacheDataModule, TextDataModule

    cache_options = ", ".join(f"--data.{name}" for name in inspect.signature(TeacherCacheDataModule).parameters)
    return [
        "\nThe data, --data.NAME VALUE: TextDataModule's (lit_distill.data, the default):",
        _options(_class_help(TextDataModule, "data")),
        "\nOr a teacher cache for OfflineDistillation: --data lit_distill.data.TeacherCacheDataModule"
        f" (data: class_path: ... in a config), then {cache_options}.",
    ]


def _class_help(cls: type, prefix: str, skip: set[str] | None = None) -> str:
    parser = LitDistillParser(usage=argparse.SUPPRESS, add_help=False, description="")
    parser.add_class_arguments(cls, prefix, skip=skip or set())
    return parser.format_help()


def _options(text: str) -> str:
    """The option lines of a class's help: without the group title and the config-file option."""
    lines = text.splitlines()
    keep, skip_next = [], False
    for line in lines:
        if skip_next:
            skip_next = False
            if line.strip() == "Path to a configuration file.":
                continue
        if re.fullmatch(r"  --\S+ CONFIG(\s+Path to a configuration file\.)?", line):
            skip_next = not line.endswith("file.")
            continue
        if line.startswith("  "):
            keep.append(line)
    return "\n".join(keep)
