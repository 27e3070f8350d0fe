"""The ``lit-distill`` command.

lit-distill demo [--quick]                      distillation end to end on the bundled corpus
lit-distill fit --config configs/<x>.yaml       train any technique from YAML (LightningCLI)
lit-distill validate|test|predict ...            the other LightningCLI subcommands
lit-distill kernels                             the loss on random logits, Triton kernels vs PyTorch

``cli_main`` is the console script (it returns the exit status, 0 on success); ``run_cli`` runs the
LightningCLI from Python and returns it. A mistyped or abbreviated option, a wrong value and a model or
tokenizer that cannot be built stop with one message and exit status 2 (``JSONARGPARSE_DEBUG=true`` shows the
traceback instead).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import textwrap
import time
import warnings
from typing import Any

from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

DTYPES = ("float32", "bfloat16", "float16")
DESCRIPTION = (
    "lit-distill: LLM knowledge distillation with PyTorch Lightning. `lit-distill fit --config"
    " configs/<x>.yaml` trains a technique (--model): SoftLabelDistillation, HardLabelDistillation (mode"
    " argmax|generate), CoDistillation, or LanguageModelTraining (a teacher, or a student trained alone);"
    " `lit-distill fit --help` lists every technique's options and the loss's."
)
# Commands outside LightningCLI, listed with its subcommands in `lit-distill --help`.
COMMANDS = {
    "demo": "The end-to-end demo: a teacher and four students on the bundled corpus (`lit-distill demo --help`).",
    "kernels": "The loss and its gradient on random logits, Triton kernels beside PyTorch (`--help` for sizes).",
}
SUBCOMMANDS = ("fit", "validate", "test", "predict")
USAGE = (
    "%(prog)s [-c CONFIG] [--print_config] [--seed_everything SEED] [--ckpt_path PATH]\n"
    "       [--trainer.NAME VALUE] [--model CLASS] [--model.init_args.NAME VALUE] [--data.NAME VALUE]"
)
TRAINER_TITLE = (
    "Lightning's Trainer flags, each with the first sentence of its documentation"
    " (https://lightning.ai/docs/pytorch/stable/common/trainer.html#trainer-flags)"
)
# Shown with a technique's options and never set by hand: the command line links them from the data.
LINKED = {"vocab_size": "data.vocab_size", "special_tokens": "data.special_tokens"}
# Longer lists of known subclasses (every torch.nn.Module for a model argument) are left out of the help.
MAX_LISTED_SUBCLASSES = 12
# Errors of a configuration (a value, a missing file or model) rather than of the program.
CONFIG_ERRORS = (ValueError, OSError, ImportError)


def cli_main(args: list[str] | None = None) -> int:
    """Entry point of the ``lit-distill`` console script: runs the command and returns 0 (the exit status).

    Errors in the options or the configuration exit with status 2 and one message.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["kernels"]:
        _kernels(_kernels_parser().parse_args(argv[1:]))
        return 0
    from .console import quiet

    quiet()
    if argv[:1] == ["demo"]:
        from .demo import demo_main

        demo_main(argv[1:])
        return 0
    # From the console LightningCLI reads sys.argv itself (passing both makes it warn).
    run_cli(None if args is None else argv)
    return 0


def run_cli(args: list[str] | None = None) -> LitDistillCLI:
    """Run ``lit-distill fit|validate|test|predict ...`` (``args`` without the program name; None reads
    ``sys.argv``) and return the :class:`LitDistillCLI`, whose ``trainer``, ``model`` and ``datamodule`` are
    those of the run."""
    from .callbacks import CheckpointOnInterrupt
    from .console import quiet
    from .data import TextDataModule
    from .modules import CausalLMModule

    quiet()
    return LitDistillCLI(
        CausalLMModule,
        TextDataModule,
        subclass_mode_model=True,
        args=args,
        trainer_defaults={"callbacks": [CheckpointOnInterrupt()]},  # added to the config's callbacks
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION, **{name: {"usage": USAGE} for name in SUBCOMMANDS}},
        parser_class=LitDistillParser,
        # The techniques take their optimizer and scheduler as model.init_args; Lightning's own --optimizer and
        # --lr_scheduler would only duplicate them.
        auto_configure_optimizers=False,
    )


# ------------------------------------------------------------ LightningCLI
class LitDistillCLI(LightningCLI):
    """LightningCLI with the data linked to the models, the teacher's tokenizer by default, verified
    checkpoints, a step-counting progress bar, and errors stated in one message."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The tokenizer decides the vocabulary and the special-token ids; models described by a config dict take
        # them from there.
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.special_tokens", "model.init_args.special_tokens", apply_on="instantiate")
        # Lightning's flags are documented on its site; the help keeps each one's first sentence.
        _shorten_help(parser, lambda dest: dest.startswith("trainer."))
        if "trainer" in parser.groups:
            parser.groups["trainer"].title = TRAINER_TITLE

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        for subcommand_parser in getattr(self, "_subcommand_parsers", {}).values():
            _shorten_help(subcommand_parser, lambda dest: dest == "ckpt_path")
        if add_subcommands:  # list the commands that cli_main runs itself
            for choice in self.parser._subcommands_action._choices_actions:
                choice.help = first_sentence(choice.help or "")  # Lightning cuts some after a line
            for name, text in COMMANDS.items():
                self.parser._subcommands_action.add_subcommand(name, LitDistillParser(description=text), help=text)

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        directory = default_tokenizer(config)
        if directory is not None:
            config.data.tokenizer = directory
            rank_zero_info(f"data.tokenizer: the teacher's, from {directory}")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
            teacher = getattr(self.model, "teacher", None)
            tokenizer = getattr(self.datamodule, "tokenizer", None)
            if teacher is not None and tokenizer is not None:
                from .data import check_tokenizer

                check_tokenizer(teacher, tokenizer)
        except Exception as err:
            message = configuration_error(err)
            if message is None or _debug():
                raise
            self._parser(self.subcommand).error(message, hint="set JSONARGPARSE_DEBUG=true to see the traceback")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

        from .console import StepProgressBar

        config = self._get(self.config_init, "trainer", default={})
        kwargs.setdefault("plugins", with_verified_checkpoints(config.get("plugins"), config.get("strategy")))
        callbacks = config.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        kwargs.setdefault("callbacks", callbacks)
        return super().instantiate_trainer(**kwargs)


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
        if not self.exit_on_error or _debug():
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


def _shorten_help(parser: LightningArgumentParser, which) -> None:
    for action in parser._actions:
        if which(action.dest) and isinstance(action.help, str):
            action.help = first_sentence(action.help)


def first_sentence(text: str) -> str:
    """The first sentence of a help text (up to a period followed by a capital letter or a backquote)."""
    return re.split(r"(?<=\.)\s+(?=[A-Z`(])", text.strip(), maxsplit=1)[0]


def _debug() -> bool:
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() not in ("", "0", "false", "no")


# ------------------------------------------------------------ errors
# Reasons jsonargparse gives for the alternatives a value was not meant as: the None of an optional argument,
# the torch.nn.Module of a model argument, a config file for a class argument, a Union without its members.
NOT_MEANT = re.compile(
    r"Expected a <class 'NoneType'>|Expected a NoneType|does not correspond to a subclass of|^Expected a path but"
    r"|^Does not validate against any of the Union subtypes$"
)


def configuration_error(err: BaseException) -> str | None:
    """The message of an error that a configuration caused, or None for anything else (a bug, which keeps its
    traceback).

    jsonargparse wraps what went wrong while building the classes; the first exception in ``err``'s ``__cause__``
    chain raised outside jsonargparse is the one to show, if it is one of ``CONFIG_ERRORS`` or Lightning's
    ``MisconfigurationException``. When jsonargparse itself refused a value, its messages are made concise, and
    the first that names a reason (not only a refused alternative) is shown.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    chain: list[BaseException] = []
    while err is not None and all(err is not seen for seen in chain):
        chain.append(err)
        err = err.__cause__
    own = next((e for e in chain if not _raised_in_jsonargparse(e)), None)
    if own is not None:
        return str(own) if isinstance(own, (*CONFIG_ERRORS, MisconfigurationException)) else None
    messages = [concise_error(str(e)) for e in chain]
    return next((m for m in messages if not NOT_MEANT.search(m) and "Union subtypes" not in m), messages[0])


def _raised_in_jsonargparse(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}jsonargparse{os.sep}" in tb.tb_frame.f_code.co_filename


def concise_error(message: str) -> str:
    """jsonargparse's error ``message`` as one statement: the full option and what is wrong with its value.

    jsonargparse nests the reasons a value fails every member of a Union (``Parser key "model": Does not
    validate against any of the Union subtypes ... - Problem with given class_path ... Parser key "loss": ...``);
    this follows the nesting to the innermost reason, skipping the alternatives the value was not meant as
    (``NOT_MEANT``). A message of another shape is returned as it is.
    """
    try:
        path, reason = _innermost(textwrap.dedent(message).strip().splitlines(), [])
    except Exception:  # another shape than expected: the message as it is
        return message.strip()
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", " ".join(line.strip() for line in reason))
    if not path:
        return reason
    option = "--" + ".".join(path)
    unknown = re.match(r"Option '([^']+)' is not accepted", reason)
    if unknown and path[-1] == "init_args":
        return f"{option}.{unknown.group(1)}: no such option{_of_class(message, path)}"
    return f"{option}: {reason}"


def _of_class(message: str, path: list[str]) -> str:
    classes = re.findall(r"Problem with given class_path '([^']+)'", message)
    return f" of {classes[len([p for p in path if p == 'init_args']) - 1]}" if classes else ""


def _innermost(lines: list[str], path: list[str]) -> tuple[list[str], list[str]]:
    lines = [line for line in lines if line.strip()]
    first = lines[0].strip()
    key = re.fullmatch(r'Parser key "([^"]+)":\s*(.*)', first)
    if key:
        rest = ([key.group(2)] if key.group(2) else []) + textwrap.dedent("\n".join(lines[1:])).splitlines()
        return _innermost(rest, [*path, *key.group(1).split(".")])
    class_path = re.fullmatch(r"Problem with given class_path '([^']+)':\s*(.*)", first)
    if class_path:
        rest = ([class_path.group(2)] if class_path.group(2) else []) + textwrap.dedent(
            "\n".join(lines[1:])
        ).splitlines()
        if not rest[0].strip().startswith(("Parser key", "Option '", "Does not validate", "- ")):
            return path, [f"{class_path.group(1)}: {' '.join(line.strip() for line in rest)}"]  # the class itself
        return _innermost(rest, [*path, "init_args"])
    if first.startswith("- "):  # the alternatives tried for one value; a Union's details follow at this indent
        union = next((i for i, line in enumerate(lines) if line.strip().startswith("- Does not validate")), None)
        if union is not None:
            return _innermost([lines[union].strip()[2:], *lines[union + 1 :]], path)
        return _innermost(_pick(_items(lines, 0)), path)
    if first.startswith("Does not validate against any of the Union subtypes"):
        start = next(i for i, line in enumerate(lines) if line.strip() == "Errors:") + 1
        return _innermost(_pick(_items(lines, start)), path)
    return path, lines


def _pick(items: list[list[str]]) -> list[str]:
    return next((item for item in items if not NOT_MEANT.search(item[0])), items[0])


def _items(lines: list[str], start: int) -> list[list[str]]:
    """The items of a ``- ...`` list starting at ``lines[start]``, each as its lines (continuations dedented)."""
    indent = len(lines[start]) - len(lines[start].lstrip())  # of the "- " that starts each item
    items: list[list[str]] = []
    for line in lines[start:]:
        if line[indent:].startswith("- ") and not line[:indent].strip():
            items.append([line[indent + 2 :]])
        elif items and len(line) - len(line.lstrip()) > indent:
            items[-1].append(line)
        else:
            break
    return [[item[0], *textwrap.dedent("\n".join(item[1:])).splitlines()] for item in items]


# ------------------------------------------------------------ defaults
def default_tokenizer(config: Namespace) -> str | None:
    """The teacher's directory when it holds a saved tokenizer and ``data.tokenizer`` is not set.

    Distillation compares the two models token by token, so the data must be tokenized as the teacher was;
    a byte-level BPE trained afresh on the data would not be the teacher's even at the same size.
    """
    from .data import saved_tokenizer_dir

    data = config.get("data")
    if data is None or not isinstance(data, Namespace) or data.get("tokenizer") is not None:
        return None
    model = config.get("model")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    teacher = init_args.get("teacher") if isinstance(init_args, Namespace) else None
    teacher_args = teacher.get("init_args") if isinstance(teacher, Namespace) else None
    name = teacher_args.get("name_or_path") if isinstance(teacher_args, Namespace) else None
    return str(name) if isinstance(name, str) and saved_tokenizer_dir(name) is not None else None


def with_verified_checkpoints(plugins: Any, strategy: Any = None) -> list:
    """Trainer ``plugins`` with :class:`~lit_distill.checkpoints.VerifiedCheckpointIO`, which checks a checkpoint
    file (CRCs, Lightning format) before resuming from it: added, or wrapped around a plain ``TorchCheckpointIO``
    given there. Another checkpoint IO, or one set on a strategy object, is left as it is."""
    from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO

    from .checkpoints import VerifiedCheckpointIO

    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if getattr(strategy, "_checkpoint_io", None) is not None:
        return plugins
    for i, plugin in enumerate(plugins):
        if isinstance(plugin, CheckpointIO):
            if type(plugin) is TorchCheckpointIO:
                plugins[i] = VerifiedCheckpointIO(plugin)
            return plugins
    return [*plugins, VerifiedCheckpointIO()]


# ------------------------------------------------------------ help
def techniques_help() -> str:
    """The technique and loss options, for ``lit-distill fit --help``: each technique's own options, those
    every technique shares, and the loss's, each as the full option to type."""
    from .losses import DistillationLoss
    from .modules import (
        CoDistillation,
        DistillationModule,
        HardLabelDistillation,
        LanguageModelTraining,
        SoftLabelDistillation,
    )

    shared = _class_help(DistillationModule, "model.init_args", skip={"loss", *LINKED})
    shared_names = set(re.findall(r"^  --model\.init_args\.(\w+)", shared, flags=re.MULTILINE)) | {"loss", *LINKED}
    parts = [
        "\nTechniques: --model CLASS (model: class_path: in a config), then --model.init_args.NAME VALUE.\n"
        "A dotted NAME reaches inside a nested class, as --model.init_args.loss.init_args.temperature 4 does."
    ]
    for cls in (SoftLabelDistillation, HardLabelDistillation, CoDistillation, LanguageModelTraining):
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
    return "\n".join(parts) + "\n"


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


# ------------------------------------------------------------ kernels check
def _kernels_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lit-distill kernels",
        description="Loss and gradients of every divergence on random logits, Triton kernels vs PyTorch.",
    )
    p.add_argument("--rows", type=int, default=8, help="tokens (rows of logits); default 8")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size; default 32000")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="logits dtype; default float32")
    p.add_argument("--temperature", type=float, default=2.0, help="softmax temperature; default 2.0")
    p.add_argument("--alpha", type=float, default=0.5, help="soft-term weight; default 0.5")
    p.add_argument("--seed", type=int, default=0)
    return p


def _kernels(ns: argparse.Namespace) -> None:
    if ns.rows <= 0 or ns.vocab <= 1:
        sys.exit("lit-distill kernels: --rows must be positive and --vocab at least 2")
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        # Must precede the first Triton call, which imports (and decorates) the kernels.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        # The interpreter evaluates masked lanes too (-inf - -inf); the kernels discard those with where().
        warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"triton\.runtime\.interpreter")
    from lit_distill.kernels import DIVERGENCES, distillation_loss, triton_available

    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, ns.dtype)
    gen = torch.Generator().manual_seed(ns.seed)
    student = (torch.randn(ns.rows, ns.vocab, generator=gen) * 2).to(device, dtype)
    teacher = (0.8 * student.float().cpu() + 1.2 * torch.randn(ns.rows, ns.vocab, generator=gen)).to(device, dtype)
    labels = torch.randint(0, ns.vocab, (ns.rows,), generator=gen).to(device)
    labels[0] = -100  # one ignored position
    backends = ["triton", "torch"] if triton_available() else ["torch"]
    where = "CUDA" if cuda else "CPU, Triton interpreter"
    print(
        f"lit-distill kernels: {ns.rows} tokens x {ns.vocab} vocab, {ns.dtype}, T={ns.temperature}, "
        f"alpha={ns.alpha}, device {device} ({where})"
    )
    if len(backends) == 1:
        print("Triton is not installed here: showing the PyTorch backend only.")
    header = f"{'divergence':<16}" + "".join(f"{f'loss [{b}]':>16}" for b in backends)
    header += f"{'max |dgrad|':>14}" if len(backends) == 2 else ""
    header += "".join(f"{f'ms [{b}]':>13}" for b in backends)
    print(header)
    print("-" * len(header))
    for divergence in DIVERGENCES:
        losses, grads, times = [], [], []
        for backend in backends:
            s = student.detach().clone().requires_grad_()
            start = time.perf_counter()
            out = distillation_loss(
                s, teacher, labels, divergence=divergence, temperature=ns.temperature, alpha=ns.alpha, backend=backend
            )
            out.loss.backward()
            if cuda:
                torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - start))
            losses.append(out.loss.item())
            grads.append(s.grad.float())
        row = f"{divergence:<16}" + "".join(f"{x:>16.6f}" for x in losses)
        if len(backends) == 2:
            row += f"{(grads[0] - grads[1]).abs().max().item():>14.2e}"
        row += "".join(f"{t:>13.1f}" for t in times)
        print(row)


if __name__ == "__main__":
    cli_main()
