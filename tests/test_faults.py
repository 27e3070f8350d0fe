"""Faults injected into training runs: NaN mid-run, Ctrl-C, damaged checkpoints, foreign vocabularies.

Each case asserts the message a user sees (docs/reliability.md's table of bad inputs lists them; the last test
checks that every message in that table is asserted somewhere in the tests).
"""

import ast
import os
import re
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import VOCAB, InterruptAt, loader, make_batch, make_module, tiny, trainer
from lightning.pytorch.callbacks import Callback

from lit_distill.callbacks import CheckpointOnInterrupt
from lit_distill.checkpoints import VerifiedCheckpointIO, verify_checkpoint
from lit_distill.losses import DistillationLoss
from lit_distill.modules import LanguageModelTraining, SoftLabelDistillation

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
ROOT = Path(__file__).parent.parent


class PoisonAt(Callback):
    """Makes the student's embeddings NaN during the given (global step, batch index) pairs."""

    def __init__(self, *at):
        self.at = set(at)
        self.handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.global_step, batch_idx) in self.at:
            embeddings = pl_module.student.get_input_embeddings()
            self.handle = embeddings.register_forward_hook(lambda module, args, out: out * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def batches(count, seed=0):
    return [make_batch(seed=seed + i, padding=[(i % 4, i % 5)]) for i in range(count)]


def padding_only(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": torch.zeros_like(batch["attention_mask"])}


def student_weights(module):
    return {k: v.clone() for k, v in module.student.state_dict().items()}


def assert_same_weights(got, expected):
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------ NaN mid-run
@pytest.mark.slow
def test_nan_mid_run_stops_naming_the_step_before_any_update():
    data = batches(6)
    pl.seed_everything(0)
    poisoned = make_module("soft")
    with pytest.raises(FloatingPointError, match=r"the training loss is nan at step 3 \(epoch 0, batch 3\)"):
        trainer(max_steps=6, callbacks=[PoisonAt((3, 3))]).fit(poisoned, loader(*data))
    pl.seed_everything(0)
    clean = make_module("soft")
    trainer(max_steps=3).fit(clean, loader(*data))
    assert_same_weights(student_weights(poisoned), student_weights(clean))  # steps 0-2 only


def test_nan_message_names_the_micro_batches_of_the_step():
    with pytest.raises(FloatingPointError, match=r"at step 1 \(epoch 0, batches 2-3\).*on_nonfinite='skip'"):
        trainer(max_steps=4, accumulate_grad_batches=2, callbacks=[PoisonAt((1, 3))]).fit(
            make_module("soft"), loader(*batches(8))
        )


@pytest.mark.parametrize("technique", ["soft", "co"])
@pytest.mark.slow
def test_skip_drops_the_poisoned_micro_batch_only(technique):
    """accumulate=2; micro-batch 3 (step 1) is NaN and skipped: the run equals one whose micro-batch 3 is all
    padding (no tokens, no gradient), including for co-distillation's teacher."""
    data = batches(8)
    pl.seed_everything(0)
    skipping = make_module(technique, on_nonfinite="skip")
    t = trainer(max_steps=4, accumulate_grad_batches=2, log_every_n_steps=1, callbacks=[PoisonAt((1, 3))])
    with pytest.warns(RuntimeWarning, match=r"skipped batch 3 at step 1 \(process 0\): its loss is nan"):
        t.fit(skipping, loader(*data))
    assert t.global_step == 4 and float(t.callback_metrics["train/skipped_batches"]) == 1.0

    pl.seed_everything(0)
    reference = make_module(technique)
    data[3] = padding_only(data[3])
    trainer(max_steps=4, accumulate_grad_batches=2).fit(reference, loader(*data))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(skipping.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_a_step_whose_batches_were_all_skipped_changes_nothing():
    """Step 2's only batch is NaN: with Adam, the run equals training on the other five batches."""
    data = batches(6)
    pl.seed_everything(0)
    skipping = make_module("soft", on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="skipped batch 2 at step 2"):
        trainer(max_steps=6, callbacks=[PoisonAt((2, 2))]).fit(skipping, loader(*data))
    pl.seed_everything(0)
    reference = make_module("soft")
    trainer(max_steps=5).fit(reference, loader(*data[:2], *data[3:]))
    assert_same_weights(student_weights(skipping), student_weights(reference))


def test_unknown_on_nonfinite():
    with pytest.raises(ValueError, match="unknown on_nonfinite='ignore'; choose 'raise' or 'skip'"):
        make_module("soft", on_nonfinite="ignore")


# -------------------------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_and_the_run_resumes_exactly(tmp_path, caplog):
    """accumulate=2, 4 micro-batches per epoch: Ctrl-C during micro-batch 2 (the first of step 1) saves after
    step 1 completes; resuming gives the uninterrupted run's weights."""
    data = batches(4)
    pl.seed_everything(0)
    uninterrupted = make_module("co")
    trainer(max_steps=6, accumulate_grad_batches=2).fit(uninterrupted, loader(*data))

    pl.seed_everything(0)
    interrupted = make_module("co")
    before = signal.getsignal(signal.SIGINT)  # not always Python's default inside a long pytest process
    saver = CheckpointOnInterrupt(dirpath=str(tmp_path))
    t = trainer(max_steps=6, accumulate_grad_batches=2, callbacks=[saver, InterruptAt(1, 2)])
    with pytest.raises(SystemExit):
        t.fit(interrupted, loader(*data))
    path = tmp_path / "interrupted.ckpt"
    assert saver.saved_path == path and torch.load(path, weights_only=False)["global_step"] == 2
    err = caplog.text
    assert "Interrupted: finishing the current optimizer step, then saving a checkpoint" in err
    assert f"Saved a resumable checkpoint at step 2 to {path}" in err
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back

    resumed = make_module("co")
    trainer(max_steps=6, accumulate_grad_batches=2).fit(resumed, loader(*data), ckpt_path=path)
    for key, value in uninterrupted.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, msg=key)


def test_interrupt_checkpoint_goes_beside_model_checkpoints(tmp_path):
    t = pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    assert CheckpointOnInterrupt().checkpoint_path(t) == tmp_path / "checkpoints" / "interrupted.ckpt"


# ----------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "good.ckpt"
    t = trainer(max_steps=2)
    t.fit(make_module("soft"), loader(make_batch()))
    t.save_checkpoint(path)
    return path


def damage(good: Path, tmp_path: Path, how: str) -> Path:
    data = good.read_bytes()
    path = tmp_path / f"{how}.ckpt"
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "corrupt":  # 64 bytes flipped in the middle: torch.load alone would accept it
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle : middle + 64]) + data[middle + 64 :])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(os.urandom(1000))
    elif how == "weights-only":
        torch.save(tiny().state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("how", "error", "match"),
    [
        ("truncated", ValueError, r"truncated.ckpt \(\d+ bytes\) is truncated or not a PyTorch checkpoint"),
        ("corrupt", ValueError, r"corrupt.ckpt is corrupt: .* does not match the checksum it was saved with"),
        ("empty", ValueError, r"empty.ckpt is empty \(0 bytes\): the run that wrote it probably stopped"),
        ("garbage", ValueError, "is truncated or not a PyTorch checkpoint"),
        ("weights-only", ValueError, r"weights-only.ckpt is not a Lightning checkpoint \(it holds \['lm_head"),
        ("missing", FileNotFoundError, "missing.ckpt does not exist"),
    ],
)
def test_damaged_checkpoint_stops_the_resume_with_a_clear_error(good_checkpoint, tmp_path, how, error, match):
    path = damage(good_checkpoint, tmp_path, how)
    module = make_module("soft")
    before = student_weights(module)
    with pytest.raises(error, match=match):  # the check comes from the plugin, as documented for Trainer.fit
        trainer(max_steps=3, plugins=[VerifiedCheckpointIO()]).fit(module, loader(make_batch()), ckpt_path=path)
    assert_same_weights(student_weights(module), before)  # nothing was loaded or trained


def test_verify_checkpoint_accepts_a_good_one(good_checkpoint):
    verify_checkpoint(good_checkpoint)
    verify_checkpoint(good_checkpoint.parent)  # a directory (sharded checkpoint) is left to its strategy


def test_checkpoint_of_another_vocabulary(good_checkpoint):
    other = SoftLabelDistillation(
        student=tiny(vocab_size=128),
        teacher=tiny(hidden=48, seed=1, vocab_size=128),
        loss=DistillationLoss(alpha=0.7),
    )
    with pytest.raises(
        ValueError,
        match=r"was saved from models of other shapes than this run's: student.model.embed_tokens.weight is"
        r" \(96, 32\) there, \(128, 32\) here.*The student's vocabulary differs: 96 tokens in the checkpoint, 128",
    ):
        trainer(max_steps=3).fit(other, loader(make_batch()), ckpt_path=good_checkpoint)


def test_checkpoint_of_another_width(good_checkpoint):
    other = LanguageModelTraining(student=tiny(hidden=64))
    with pytest.raises(ValueError, match=r"student.model.embed_tokens.weight is \(96, 32\) there, \(96, 64\) here"):
        trainer(max_steps=3).fit(other, loader(make_batch()), ckpt_path=good_checkpoint)


# ------------------------------------------------------------------------------------------ vocabularies
def test_teacher_of_another_tokenizer_is_named():
    """The data module's tokenizer has more tokens than a pretrained teacher (the CLI links vocab_size)."""
    teacher = tiny(hidden=48)  # 96 tokens, as if loaded from a directory
    with pytest.raises(
        ValueError,
        match="the tokenizer has 128 tokens but the teacher's vocabulary has only 96: the teacher was trained with"
        " another tokenizer",
    ):
        SoftLabelDistillation(student=tiny(vocab_size=128), teacher=teacher, vocab_size=128)


def test_a_smaller_tokenizer_than_a_padded_head_is_fine():
    module = SoftLabelDistillation(student=tiny(), teacher=tiny(hidden=48), vocab_size=VOCAB - 6)
    assert module.student.get_output_embeddings().out_features == VOCAB


# ------------------------------------------------------------------------ docs/reliability.md's table
REGEX_WILDCARD = re.compile(r"\.\*\??|\.\+\??|\\d\+")


def _as_text(node: ast.expr, regex: bool) -> str | None:
    """A string literal as the message it stands for: an f-string's fields and, in a regex, ``.*``, ``.+`` and
    ``\\d+`` read as "…", and escapes are dropped. None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return re.sub(r"\\(.)", r"\1", REGEX_WILDCARD.sub("…", node.value)) if regex else node.value
    if isinstance(node, ast.JoinedStr):
        parts = [_as_text(part, regex) if isinstance(part, ast.Constant) else "…" for part in node.values]
        return "".join(parts)
    return None


def _string_literals(node: ast.AST):
    if isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str)):
        yield node
        return
    for child in ast.iter_child_nodes(node):
        yield from _string_literals(child)


def _parametrized(function: ast.FunctionDef) -> dict[str, list[ast.expr]]:
    """The values each ``pytest.mark.parametrize`` argument of ``function`` takes."""
    values: dict[str, list[ast.expr]] = {}
    for decorator in function.decorator_list:
        if not (isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "parametrize"):
            continue
        names_node, rows = decorator.args[:2]
        if isinstance(names_node, ast.Constant):
            names = [name.strip() for name in names_node.value.split(",")]
        else:
            names = [element.value for element in names_node.elts]
        for row in getattr(rows, "elts", []):
            if isinstance(row, ast.Call):  # pytest.param(...)
                row = ast.Tuple(elts=row.args) if len(names) > 1 else row.args[0]
            for name, value in zip(names, row.elts if len(names) > 1 else [row], strict=False):
                values.setdefault(name, []).append(value)
    return values


def asserted_messages(source: str) -> set[str]:
    """What a test file asserts as whole messages: each ``match=`` of ``pytest.raises`` or ``pytest.warns``
    (resolved through ``parametrize`` where it is an argument), and each string in an ``assert`` condition."""
    found = set()
    for function in ast.parse(source).body:
        if not isinstance(function, ast.FunctionDef):
            continue
        parameters = _parametrized(function)
        for node in ast.walk(function):
            if isinstance(node, ast.Assert):
                found |= {_as_text(literal, regex=False) for literal in _string_literals(node.test)}
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("raises", "warns"):
                for keyword in node.keywords:
                    if keyword.arg == "match":
                        value = keyword.value
                        candidates = parameters.get(value.id, []) if isinstance(value, ast.Name) else [value]
                        found |= {_as_text(candidate, regex=True) for candidate in candidates}
    return found - {None}


def test_every_message_in_the_reliability_table_is_asserted_in_a_test():
    """Each message of the table in docs/reliability.md (where "…" stands for any text) is, from its first
    character to its last, a message some test asserts, so a table that drifts from the tests fails here."""
    page = (ROOT / "docs" / "reliability.md").read_text()
    table = page.split("## Bad input and faults", 1)[1].split("\n## ", 1)[0]
    messages = re.findall(r"^\|[^|]+\|[^|]*\| `([^`]+)`", table, flags=re.MULTILINE)
    assert len(messages) >= 25, messages
    asserted = set().union(*(asserted_messages(p.read_text()) for p in (ROOT / "tests").glob("test_*.py")))
    missing = [
        message
        for message in messages
        if not any(re.fullmatch(".*".join(map(re.escape, message.split("…"))), text) for text in asserted)
    ]
    assert not missing, f"messages in docs/reliability.md's table that no test asserts as a whole: {missing}"
