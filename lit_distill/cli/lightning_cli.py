"""``lit-distill fit|validate|test|predict``: LightningCLI with the data linked to the models, the teacher's
tokenizer by default, verified checkpoints, a step-counting progress bar and one-message errors.

A mistyped or abbreviated option, a wrong value and a model or tokenizer that cannot be built stop with one
message and exit status 2 (``JSONARGPARSE_DEBUG=true`` shows the traceback instead).
"""

from __future__ import annotations

from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from .errors import configuration_error, debug_requested
from .parser import SUBCOMMANDS, LitDistillParser, first_sentence, shorten_help

DESCRIPTION = (
    "lit-distill: LLM knowledge distillation with PyTorch Lightning. `lit-distill fit --config"
    " configs/<x>.yaml` trains a technique (--model): SoftLabelDistillation, HardLabelDistillation (mode"
    " argmax|generate), CoDistillation, OnPolicyDistillation, OfflineDistillation (from a teacher cache), or"
    " LanguageModelTraining (a teacher, or a student trained alone);"
    " `lit-distill fit --help` lists every technique's options and the loss's."
)
# Commands outside LightningCLI, listed with its subcommands in `lit-distill --help`.
COMMANDS = {
    "demo": "The end-to-end demo: a teacher and seven students on the bundled corpus (`lit-distill demo --help`).",
    "kernels": "The loss and its gradient on random logits, Triton kernels beside PyTorch (`--help` for sizes).",
    "cache-teacher": "A teacher's top-k or sampled signal over the data, stored for OfflineDistillation (`--help`).",
}
USAGE = (
    "%(prog)s [-c CONFIG] [--print_config] [--seed_everything SEED] [--ckpt_path PATH]\n"
    "       [--trainer.NAME VALUE] [--model CLASS] [--model.init_args.NAME VALUE] [--data.NAME VALUE]"
)
DEFAULT_DATA = "lit_distill.data.TextDataModule"
# ckpt_path values that name a checkpoint Lightning finds itself, not a file
LIGHTNING_CKPT_NAMES = ("last", "best", "hpc", "registry")
TRAINER_TITLE = (
    "Lightning's Trainer flags, each with the first sentence of its documentation"
    " (https://lightning.ai/docs/pytorch/stable/common/trainer.html#trainer-flags)"
)


def run_cli(args: list[str] | None = None) -> LitDistillCLI:
    """Run ``lit-distill fit|validate|test|predict ...`` (``args`` without the program name; None reads
    ``sys.argv``) and return the :class:`LitDistillCLI`, whose ``trainer``, ``model`` and ``datamodule`` are
    those of the run."""
    from lightning.pytorch import LightningDataModule

    from ..callbacks import CheckpointOnInterrupt
    from ..modules import CausalLMModule
    from ..reporting import quiet

    quiet()
    return LitDistillCLI(
        CausalLMModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,  # TextDataModule by default (see add_arguments_to_parser), or a teacher cache
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
        # The data is a TextDataModule unless the config names another class (a TeacherCacheDataModule): a `data:`
        # section without class_path holds TextDataModule's arguments, as before.
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA}})
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.special_tokens", "model.init_args.special_tokens", apply_on="instantiate")
        # Lightning's flags are documented on its site; the help keeps each one's first sentence.
        shorten_help(parser, lambda dest: dest.startswith("trainer."))
        if "trainer" in parser.groups:
            parser.groups["trainer"].title = TRAINER_TITLE

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        for subcommand_parser in getattr(self, "_subcommand_parsers", {}).values():
            shorten_help(subcommand_parser, lambda dest: dest == "ckpt_path")
        if add_subcommands:  # list the commands that cli_main runs itself
            for choice in self.parser._subcommands_action._choices_actions:
                choice.help = first_sentence(choice.help or "")  # Lightning cuts some after a line
            for name, text in COMMANDS.items():
                self.parser._subcommands_action.add_subcommand(name, LitDistillParser(description=text), help=text)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads a checkpoint's hyperparameters (a torch.load) right after parsing: check the file
        # first, so that a damaged or missing one is one message rather than a traceback from inside torch.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is None or "://" in str(ckpt_path) or str(ckpt_path) in LIGHTNING_CKPT_NAMES:
            return
        from ..checkpoints import verify_checkpoint

        try:
            verify_checkpoint(ckpt_path)
        except (ValueError, FileNotFoundError) as err:
            if debug_requested():
                raise
            self._parser(subcommand).error(str(err), hint="set JSONARGPARSE_DEBUG=true to see the traceback")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        directory = default_tokenizer(config)
        if directory is not None:
            config.data.init_args.tokenizer = directory
            rank_zero_info(f"data.tokenizer: the teacher's, from {directory}")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
            # the data's tokenizer must be the one the model reads (the teacher's; the student's across tokenizers)
            check = getattr(self.model, "check_data_tokenizer", None)
            if callable(check) and self.datamodule is not None:
                check(self.datamodule)
            link_stop_token_ids(self.model, self.datamodule)
        except Exception as err:
            message = configuration_error(err)
            if message is None or debug_requested():
                raise
            self._parser(self.subcommand).error(message, hint="set JSONARGPARSE_DEBUG=true to see the traceback")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

        from ..reporting import StepProgressBar

        config = self._get(self.config_init, "trainer", default={})
        kwargs.setdefault("plugins", with_verified_checkpoints(config.get("plugins"), config.get("strategy")))
        callbacks = config.get("callbacks")
        callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        kwargs.setdefault("callbacks", callbacks)
        return super().instantiate_trainer(**kwargs)


# ------------------------------------------------------------ defaults
def default_tokenizer(config: Namespace) -> str | None:
    """The teacher's directory when it holds a saved tokenizer and ``data.tokenizer`` is not set.

    Distillation compares the two models token by token, so the data must be tokenized as the teacher was;
    a byte-level BPE trained afresh on the data would not be the teacher's even at the same size.
    """
    from ..data import saved_tokenizer_dir

    data = config.get("data")
    if not isinstance(data, Namespace) or not _is_text_data(data.get("class_path")):
        return None
    data = data.get("init_args")
    if not isinstance(data, Namespace) or data.get("tokenizer") is not None:
        return None
    model = config.get("model")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    teacher = init_args.get("teacher") if isinstance(init_args, Namespace) else None
    teacher_args = teacher.get("init_args") if isinstance(teacher, Namespace) else None
    name = teacher_args.get("name_or_path") if isinstance(teacher_args, Namespace) else None
    return str(name) if isinstance(name, str) and saved_tokenizer_dir(name) is not None else None


def _is_text_data(class_path: Any) -> bool:
    """Whether a data class path names TextDataModule, StreamingTextDataModule, ChatDataModule or PromptDataModule,
    whose tokenizer defaults to the teacher's (jsonargparse may shorten the path, as in
    ``lit_distill.TextDataModule``)."""
    import importlib

    from ..data import ChatDataModule, PromptDataModule, StreamingTextDataModule, TextDataModule

    module, _, name = str(class_path).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None) in (
            TextDataModule,
            StreamingTextDataModule,
            ChatDataModule,
            PromptDataModule,
        )
    except ImportError:
        return False


def link_stop_token_ids(model: Any, datamodule: Any) -> None:
    """Give an ``OnPolicyDistillation`` without ``stop_token_ids`` the data's (chat and prompt data have them: EOS
    and the template's end of turn). Set after both are built, as ``link_arguments`` would need every technique to
    take the argument; a config's own ``stop_token_ids`` stay."""
    from ..modules import OnPolicyDistillation

    stops = getattr(datamodule, "stop_token_ids", None)
    if isinstance(model, OnPolicyDistillation) and model.stop_token_ids is None and stops:
        model.stop_token_ids = list(stops)
        rank_zero_info(f"model.stop_token_ids: the data's, {model.stop_token_ids}")


def with_verified_checkpoints(plugins: Any, strategy: Any = None) -> list:
    """Trainer ``plugins`` with :class:`~lit_distill.checkpoints.VerifiedCheckpointIO`, which checks a checkpoint
    file (CRCs, Lightning format) before resuming from it: added, or wrapped around a plain ``TorchCheckpointIO``
    given there. Another checkpoint IO, or one set on a strategy object, is left as it is."""
    from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO

    from ..checkpoints import VerifiedCheckpointIO

    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if getattr(strategy, "_checkpoint_io", None) is not None:
        return plugins
    for i, plugin in enumerate(plugins):
        if isinstance(plugin, CheckpointIO):
            if type(plugin) is TorchCheckpointIO:
                plugins[i] = VerifiedCheckpointIO(plugin)
            return plugins
    return [*plugins, VerifiedCheckpointIO()]
