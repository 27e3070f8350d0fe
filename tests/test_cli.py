"""The ``lit-distill`` command: every shipped config parses and trains a few steps, overrides, the demo,
the exit status, errors in one message, the help, and what a run prints."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import permuted_tokenizer
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lit_distill.callbacks import StudentEMA
from lit_distill.checkpoints import VerifiedCheckpointIO
from lit_distill.cli import cli_main
from lit_distill.cli.errors import concise_error
from lit_distill.cli.lightning_cli import run_cli, with_verified_checkpoints
from lit_distill.kernels import DIVERGENCES

pytestmark = [
    pytest.mark.slow,  # trains every config a few steps, runs the console script and the demo
    pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::RuntimeWarning"),
]
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICK = [
    "--trainer.max_steps", "2", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--data.batch_size", "2", "--data.max_train_tokens", "4096",
]  # fmt: skip
CONSOLE_SCRIPT = str(Path(sys.executable).parent / "lit-distill")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory where configs/teacher.yaml has run (it exports artifacts/teacher)."""
    path = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        mp.setenv("LIT_DISTILL_CACHE", str(path / "cache"))
        run_cli(["fit", "--config", str(CONFIGS / "teacher.yaml"), *QUICK])
    return path


def console(workdir: Path, *args: str, timeout: int = 600) -> tuple[int, str]:
    """Run the installed console script in ``workdir``, stdout and stderr into a file as a redirected run would;
    the exit status and what it wrote."""
    log = workdir / "console.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LIT_DISTILL_CACHE": str(workdir / "cache")}
    with open(log, "w") as out:
        result = subprocess.run(
            [CONSOLE_SCRIPT, *args], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
        )
    return result.returncode, log.read_text()


@pytest.mark.parametrize(
    ("config", "student_dir"),
    [
        ("soft_label.yaml", "student-soft-label"),
        ("hard_label_argmax.yaml", "student-hard-label"),
        ("hard_label_generate.yaml", "student-hard-label-generate"),
        ("co_distillation.yaml", "student-co-distillation"),
        ("on_policy.yaml", "student-on-policy"),
    ],
)
def test_every_config_trains_a_few_steps_and_exports(workdir, monkeypatch, config, student_dir):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))
    cli = run_cli(["fit", "--config", str(CONFIGS / config), *QUICK])
    assert cli.trainer.global_step == 2
    assert cli.model.student.config.vocab_size == cli.datamodule.vocab_size  # linked from the data module
    # The data is tokenized as the teacher was: its tokenizer, saved with it by configs/teacher.yaml.
    teacher_tokenizer = AutoTokenizer.from_pretrained(workdir / "artifacts" / "teacher")
    assert cli.datamodule.tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
    # The student's special-token ids are the tokenizer's (linked from the data module).
    tokenizer = cli.datamodule.tokenizer
    student_config = cli.model.student.config
    assert (student_config.bos_token_id, student_config.eos_token_id, student_config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert isinstance(cli.trainer.strategy.checkpoint_io, VerifiedCheckpointIO)
    student = AutoModelForCausalLM.from_pretrained(workdir / "artifacts" / student_dir)
    assert student.config.hidden_size == 96
    # the configs of the demo's students keep the average of the student's weights, as the demo does
    averaged = [c.updates for c in cli.trainer.callbacks if isinstance(c, StudentEMA)]
    assert averaged == ([] if config == "hard_label_generate.yaml" else [2])
    if config == "co_distillation.yaml":
        assert (workdir / "artifacts" / "teacher-co-distillation" / "config.json").exists()
    if config == "on_policy.yaml":  # its OnPolicyEvaluation scored the student's samples at validation
        metrics = cli.trainer.callback_metrics
        assert 0 < float(metrics["val/teacher_nll_of_student"]) < 20 and float(metrics["val/student_reverse_kl"]) > 0


def test_cross_tokenizer_config_trains_a_student_with_its_own_tokenizer(workdir, monkeypatch):
    """configs/cross_tokenizer.yaml as its header says: the student's tokenizer written first, then the fit."""
    from lit_distill.demo.student_tokenizer import main as write_student_tokenizer

    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))
    write_student_tokenizer(["artifacts/student-tokenizer", "--vocab-size", "512"])
    cli = run_cli(["fit", "--config", str(CONFIGS / "cross_tokenizer.yaml"), *QUICK])
    assert cli.trainer.global_step == 2
    # the student is built for its own tokenizer (linked from the data module), the teacher keeps its own
    assert cli.model.student.config.vocab_size == len(cli.datamodule.tokenizer) == 512
    assert cli.model.teacher.config.vocab_size == len(cli.datamodule.teacher_tokenizer) != 512
    assert 0 < float(cli.trainer.callback_metrics["val/bits_per_byte"]) < 20
    assert 0 < float(cli.trainer.callback_metrics["train/boundary_share"]) <= 1
    assert (workdir / "artifacts" / "student-cross-tokenizer" / "config.json").exists()


def test_ctrl_c_saves_a_checkpoint_the_command_line_resumes_from(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))
    interrupt = '{"class_path": "test_faults.InterruptAt", "init_args": {"step": 1}}'
    args = ["fit", "--config", str(CONFIGS / "soft_label.yaml"), *QUICK, "--trainer.max_steps", "3"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli([*args, f"--trainer.callbacks+={interrupt}"])
    assert exit_info.value.code == 1
    saved = sorted(workdir.glob("**/checkpoints/interrupted.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    assert torch.load(saved, weights_only=False)["global_step"] == 2  # step 1 finished, then saved
    cli = run_cli([*args, "--ckpt_path", str(saved)])
    assert cli.trainer.ckpt_path == str(saved) and cli.trainer.global_step == 3


def test_teacher_config_exported_the_teacher_and_tokenizer(workdir):
    assert (workdir / "artifacts" / "teacher" / "config.json").exists()
    assert (workdir / "artifacts" / "teacher" / "tokenizer.json").exists()


def test_exported_teacher_has_the_tokenizers_special_ids(workdir):
    """Llama's defaults (bos 1, eos 2) are the BPE's pad and "!": generate() stopped at the first "!"."""
    directory = workdir / "artifacts" / "teacher"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = AutoConfig.from_pretrained(directory)
    assert tokenizer.convert_ids_to_tokens([config.eos_token_id, config.pad_token_id]) == ["<|endoftext|>", "<|pad|>"]
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id


def test_command_line_overrides(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))
    cli = run_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "soft_label.yaml"),
            *QUICK,
            "--model.init_args.loss.init_args.temperature",
            "3",
            "--trainer.max_steps",
            "1",
            "--trainer.plugins",
            "lightning.pytorch.plugins.environments.LightningEnvironment",
        ]
    )
    assert cli.model.loss.temperature == 3.0 and cli.trainer.global_step == 1
    # plugins set on the command line or in a config keep the checkpoint check
    assert isinstance(cli.trainer.strategy.checkpoint_io, VerifiedCheckpointIO)


def test_gpu_example_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "hf_example.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "meta-llama/Llama-3.1-8B" in printed and "SoftLabelDistillation" in printed


@pytest.mark.parametrize("method", ["topk", "sampled"])
def test_cache_teacher_then_offline_config_trains_from_the_cache(workdir, monkeypatch, method):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))
    cache = f"artifacts/teacher-cache-{method}"
    status = cli_main(
        ["cache-teacher", "--config", str(CONFIGS / "cache_teacher.yaml"), "--model.method", method,
         "--cache_dir", cache, "--max_sequences", "12", "--shard_sequences", "5", "--data.max_train_tokens", "4096",
         "--trainer.enable_progress_bar", "false"]
    )  # fmt: skip
    assert status == 0
    manifest = json.loads((workdir / cache / "manifest.json").read_text())
    assert (manifest["method"], manifest["k"], manifest["sequences"], len(manifest["shards"])) == (method, 64, 12, 3)
    quick = [arg for arg in QUICK if "max_train_tokens" not in arg and arg != "4096"]
    cli = run_cli(["fit", "--config", str(CONFIGS / f"offline_{method}.yaml"), *quick])
    assert cli.trainer.global_step == 2 and type(cli.datamodule).__name__ == "TeacherCacheDataModule"
    assert cli.model.student.config.vocab_size == manifest["vocab_size"]  # linked from the cache's tokenizer
    assert (workdir / "artifacts" / f"student-offline-{method}" / "config.json").exists()


def test_every_config_is_covered():
    tested = {
        "cache_teacher.yaml",
        "offline_topk.yaml",
        "offline_sampled.yaml",
        "teacher.yaml",
        "soft_label.yaml",
        "cross_tokenizer.yaml",
        "hard_label_argmax.yaml",
        "hard_label_generate.yaml",
        "co_distillation.yaml",
        "on_policy.yaml",
        "chat_soft_label.yaml",
        "chat_on_policy.yaml",
        "chat_cache_teacher.yaml",
        "chat_offline.yaml",
        "hf_example.yaml",
        "fsdp_example.yaml",  # parsed in test_sharded.py
        "deepspeed_example.yaml",  # parsed in test_sharded.py
    }
    assert {p.name for p in CONFIGS.glob("*.yaml")} == tested


CHAT_QUICK = [
    "--trainer.max_steps", "2", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--data.batch_size", "2",
    "--data.train", "artifacts/dialogues/train-head.jsonl",  # 200 of them: the whole file tokenizes for a minute
]  # fmt: skip


def chat_workdir(workdir, monkeypatch) -> Path:
    """``workdir`` with the dialogues of the bundled plays written as the chat configs' headers say."""
    from lit_distill.data.dialogues import main as write_dialogues

    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))
    dialogues = workdir / "artifacts" / "dialogues"
    if not (dialogues / "train-head.jsonl").exists():
        write_dialogues(["artifacts/dialogues"])
        head = (dialogues / "train.jsonl").read_text().splitlines(keepends=True)[:200]
        (dialogues / "train-head.jsonl").write_text("".join(head))
    return dialogues


@pytest.mark.parametrize(
    ("config", "student_dir"),
    [("chat_soft_label.yaml", "student-chat-soft-label"), ("chat_on_policy.yaml", "student-chat-on-policy")],
)
def test_chat_configs_train_on_the_dialogues_of_the_bundled_plays(workdir, monkeypatch, config, student_dir):
    chat_workdir(workdir, monkeypatch)
    cli = run_cli(["fit", "--config", str(CONFIGS / config), *CHAT_QUICK])
    assert cli.trainer.global_step == 2
    tokenizer = cli.datamodule.tokenizer  # the teacher's, by default, with the bundled template
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(workdir / "artifacts" / "teacher").get_vocab()
    assert cli.model.student.config.vocab_size == len(tokenizer)
    assert cli.datamodule.stop_token_ids == [tokenizer.eos_token_id]
    assert (workdir / "artifacts" / student_dir / "config.json").exists()
    if config == "chat_soft_label.yaml":
        counts = cli.datamodule.describe()
        assert counts["train"]["conversations"] == 200 and counts["val"]["conversations"] > 1_000
        assert counts["train"]["merged boundaries"] == 0 and counts["train"]["counted tokens"] > 0
        assert float(cli.trainer.callback_metrics["val/loss"]) > 0
    else:  # the command line gave the model the data's stop ids; every batch was on-policy
        assert cli.model.stop_token_ids == [tokenizer.eos_token_id] == cli.model.stop_ids()
        assert cli.model.counts["on_policy"] == cli.model.counts["batches"] > 0
        metrics = cli.trainer.callback_metrics
        assert 0 < float(metrics["val/teacher_nll_of_student"]) < 20 and float(metrics["val/student_reverse_kl"]) > 0


def test_chat_cache_teacher_then_chat_offline_config_trains_from_the_cache(workdir, monkeypatch, caplog):
    chat_workdir(workdir, monkeypatch)
    cache = workdir / "artifacts" / "teacher-cache-chat"
    with caplog.at_level(logging.INFO):
        status = cli_main(
            ["cache-teacher", "--config", str(CONFIGS / "chat_cache_teacher.yaml"), "--max_sequences", "12",
             "--shard_sequences", "5", "--data.init_args.train", "artifacts/dialogues/train-head.jsonl",
             "--trainer.enable_progress_bar", "false"]
        )  # fmt: skip
    assert status == 0
    manifest = json.loads((cache / "manifest.json").read_text())
    assert (manifest["layout"], manifest["sequences"], len(manifest["shards"])) == ("rows", 12, 3)
    assert 0 < manifest["signal_positions"] < manifest["tokens"]  # the system and user turns carry no signal
    size = sum((cache / shard["file"]).stat().st_size for shard in manifest["shards"])
    per_learned = round(size / manifest["signal_positions"])
    assert f"{manifest['signal_positions']:,} learned ({per_learned} bytes each)" in caplog.text
    assert per_learned < 6 * 64 + 64  # 6 bytes per slot, and the rows' own tokens are a small share
    cli = run_cli(["fit", "--config", str(CONFIGS / "chat_offline.yaml"), *without(CHAT_QUICK, "--data.train")])
    assert cli.trainer.global_step == 2 and type(cli.datamodule).__name__ == "TeacherCacheDataModule"
    assert cli.datamodule.settings.layout == "rows" and float(cli.trainer.callback_metrics["val/loss"]) > 0
    assert (workdir / "artifacts" / "student-chat-offline" / "config.json").exists()


def test_a_configs_own_stop_token_ids_are_kept(workdir, monkeypatch):
    chat_workdir(workdir, monkeypatch)
    args = [*without(CHAT_QUICK, "--trainer.max_steps"), "--trainer.max_steps", "1"]
    cli = run_cli(
        ["fit", "--config", str(CONFIGS / "chat_on_policy.yaml"), *args, "--model.init_args.stop_token_ids", "[7, 9]"]
    )
    assert cli.model.stop_token_ids == [7, 9] != cli.datamodule.stop_token_ids


def test_help_lists_the_techniques_and_every_command(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    for name in ("SoftLabelDistillation", "HardLabelDistillation", "CoDistillation", "OnPolicyDistillation"):
        assert name in out
    assert "LanguageModelTraining" in out
    for command in ("fit", "validate", "demo", "kernels"):
        assert re.search(rf"^    {command} +\S", out, flags=re.MULTILINE), command  # listed with its help


def test_demo_quick_writes_table_logs_and_plot(tmp_path, capsys):
    cli_main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    students = ("alone", "soft-label", "hard-label", "on-policy", "offline top-k", "offline sampled")
    own_tokenizer = ("own-tokenizer alone", "cross-tokenizer")  # compared in bits per byte, not on the plot
    for row in ("teacher", *(f"student: {name}" for name in (*students, *own_tokenizer))):
        assert row in out
    assert "student: co-distillation" not in out  # only with --techniques: the demo keeps to about ten minutes
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert len(results["rows"]) == 9 and all(r["val_loss"] > 0 for r in results["rows"])
    assert all(0 < r["bits_per_byte"] < 20 for r in results["rows"])
    # the teacher's scores of each model's own samples (not of the students of another tokenizer); the teacher's
    # reverse KL to itself is 0
    same = [r for r in results["rows"] if r["model"].removeprefix("student: ") not in own_tokenizer]
    assert len(same) == 7 and all(0 < r["teacher_nll_of_samples"] < 20 for r in same)
    assert results["rows"][0]["reverse_kl_on_samples"] == 0 and results["rows"][1]["reverse_kl_on_samples"] > 0
    # the plot's curves are measured like the table: each ends at its student's number, at the last step
    table = {r["model"]: r["val_loss"] for r in results["rows"]}
    assert {name: curve[-1] for name, curve in results["curves"].items()} == {
        name: [30, table[f"student: {name}"]] for name in (*students, *own_tokenizer)
    }
    # the teacher caches' size: 32 slots of 6 bytes and an int32 token id per token
    assert re.search(r"cache topk: 15,360 tokens, .* MiB \(196 bytes/token\), written in", out)
    assert "--quick is a smoke test" in out and "does not beat" not in out
    assert (tmp_path / "demo" / "validation_curves.png").stat().st_size > 0
    assert list((tmp_path / "demo" / "tensorboard").rglob("events.out.tfevents.*"))
    # a second run reuses the cached teacher
    cli_main(["demo", "--quick", "--out", str(tmp_path / "demo2"), "--cache-dir", str(tmp_path / "cache")])
    again = capsys.readouterr().out
    assert "teacher: reusing" in again and "teacher cache (sampled, 32 slots, T=2): reusing" in again


def test_demo_runs_the_techniques_asked_for_with_the_student_seed(tmp_path, capsys, monkeypatch):
    from lightning.pytorch import Trainer

    # what each fit clips at and averages over: the students clip at 1 and end as the average of their weights,
    # the teacher (cached by its config) neither
    clips, averages = [], []
    fit = Trainer.fit

    def recording_fit(trainer, *args, **kwargs):
        clips.append(trainer.gradient_clip_val)
        averages.append([c.decay for c in trainer.callbacks if isinstance(c, StudentEMA)])
        return fit(trainer, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    args = ["demo", "--quick", "--out", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "cache")]
    cli_main([*args, "--techniques", "alone,on-policy", "--student-seed", "7"])
    assert clips == [None, 1.0, 1.0] and averages == [[], [0.9], [0.9]]
    rows = json.loads((tmp_path / "demo" / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["teacher", "student: alone", "student: on-policy"]
    out = capsys.readouterr().out
    assert "teacher cache" not in out  # no offline student asked for, no cache written
    assert "on-policy: the teacher's NLL of its samples" not in out  # the verdict needs soft-label too
    cli_main([*args, "--techniques", "alone", "--student-seed", "8"])
    other = json.loads((tmp_path / "demo" / "results.json").read_text())["rows"]
    assert other[1]["val_loss"] != rows[1]["val_loss"]  # another seed: another initialization and order


def test_demo_rejects_bad_sizes(tmp_path):
    with pytest.raises(SystemExit, match="--student-steps must be positive"):
        cli_main(["demo", "--quick", "--student-steps", "0", "--out", str(tmp_path)])


def test_demo_unwritable_cache_dir(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("x")
    with pytest.raises(PermissionError, match="not writable"):
        cli_main(["demo", "--quick", "--cache-dir", str(blocked / "cache"), "--out", str(tmp_path / "o")])


def test_kernels_prints_matching_losses_for_every_divergence(capsys):
    cli_main(["kernels", "--rows", "3", "--vocab", "700", "--temperature", "1.5"])
    out = capsys.readouterr().out
    assert "3 tokens x 700 vocab" in out
    for divergence in DIVERGENCES:
        line = next(line for line in out.splitlines() if line.startswith(divergence + " "))
        triton_loss, torch_loss, grad_diff = (float(x) for x in re.split(r"\s+", line)[1:4])
        assert triton_loss == pytest.approx(torch_loss, rel=1e-5)
        assert grad_diff < 1e-6


def test_kernels_through_the_console_script_without_triton_interpret_set(tmp_path):
    """As a user runs it on a CPU machine: the command asks for the interpreter before anything imports Triton
    (Lightning does, through torch), else every kernel call fails outside the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [CONSOLE_SCRIPT, "kernels", "--rows", "2", "--vocab", "300"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(line.split(" ")[0] in DIVERGENCES for line in proc.stdout.splitlines()) == len(DIVERGENCES)


# ------------------------------------------------------------ the command line as a new user meets it
@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("garbage", r"checkpoint garbage.ckpt \(1000 bytes\) is truncated or not a PyTorch checkpoint"),
        ("missing", r"checkpoint missing.ckpt does not exist"),
        ("weights", r"weights.ckpt is not a Lightning checkpoint \(it holds \['lm_head.weight'"),
    ],
)
def test_a_bad_checkpoint_is_one_message_with_exit_status_2(workdir, how, message):
    """LightningCLI reads the checkpoint before fit, and the Trainer during it: neither shows a traceback."""
    path = workdir / f"{how}.ckpt"
    if how == "garbage":
        path.write_bytes(os.urandom(1000))
    elif how == "weights":
        torch.save(AutoModelForCausalLM.from_pretrained(workdir / "artifacts" / "teacher").state_dict(), path)
    config = ["fit", "--config", str(CONFIGS / "teacher.yaml"), *QUICK, "--trainer.callbacks", "[]"]
    status, out = console(workdir, *config, "--ckpt_path", path.name)
    assert status == 2, out[-3000:]
    assert re.search(rf"^lit-distill fit: error: {message}", out, re.MULTILINE), out[-3000:]
    assert "Traceback" not in out


def without(args: list[str], option: str) -> list[str]:
    i = args.index(option)
    return args[:i] + args[i + 2 :]


def test_a_successful_fit_exits_0_through_the_console_script_and_prints_progress_in_steps(workdir):
    """Redirected to a file: exit status 0, no CLI object printed, no notices, one flushed line per step."""
    args = without(QUICK, "--trainer.enable_progress_bar")
    status, out = console(
        workdir,
        *["fit", "--config", str(CONFIGS / "soft_label.yaml"), *without(args, "--trainer.val_check_interval")],
        *["--trainer.accumulate_grad_batches", "2", "--trainer.val_check_interval", "2"],
        *["--trainer.log_every_n_steps", "1"],
    )
    assert status == 0, out
    assert "object at 0x" not in out
    for noise in ("GPU available", "TPU available", "Tip:", "LeafSpec", "Loading weights", "Writing model shards"):
        assert noise not in out, noise
    assert "v_num" not in out and "Epoch 0/-2" not in out
    assert re.findall(r"^step (\d+/\d+)", out, flags=re.MULTILINE) == ["1/2", "2/2"]  # optimizer steps, not 4/2
    assert re.search(r"^validation at step 1: val/", out, flags=re.MULTILINE)


def test_an_abbreviated_option_is_an_error_not_another_option(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))
    weights = workdir / "artifacts" / "teacher" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(CONFIGS / "teacher.yaml"), *without(QUICK, "--trainer.max_steps"),
                  "--trainer.max_step", "2"])  # fmt: skip
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --trainer.max_step 2" in err and "did you mean --trainer.max_steps" in err
    assert weights.stat().st_mtime_ns == before  # nothing trained, artifacts/teacher left as it was


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--model.init_args.loss.init_args.temperature", "abc",
         "--model.init_args.loss.init_args.temperature: Expected a float. Got value: abc"),
        ("--model.init_args.no_such_option", "1",
         "--model.init_args.no_such_option: no such option of lit_distill.modules.SoftLabelDistillation"),
        ("--trainer.max_steps", "many", "--trainer.max_steps: Expected a int. Got value: many"),
        ("--model.init_args.loss.init_args.divergence", "kl", "unknown divergence 'kl'; choose one of"),
        ("--model.init_args.student.init_args.dtype", "float8", "unknown dtype 'float8'; choose one of"),
        ("--data.files", "[missing.txt]", "corpus file missing.txt does not exist"),
    ],
    ids=["type", "unknown-option", "trainer-type", "library-check", "nested-union", "missing-file"],
)  # fmt: skip
def test_an_error_is_one_message_with_exit_status_2(workdir, monkeypatch, capsys, option, value, message):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(CONFIGS / "soft_label.yaml"), *QUICK, option, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err and "Union subtypes" not in err
    error = err[err.index("fit: error: ") :]
    assert error.startswith(f"fit: error: {message}"), err
    assert len(error.strip().splitlines()) == 2  # the message and where to look next


def test_fit_without_a_technique_says_how_to_give_one(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["fit"])
    assert info.value.code == 2
    assert "fit: error: --model required (a --config sets it: lit-distill fit --config configs/<x>.yaml)" in (
        capsys.readouterr().err
    )


def test_concise_error_follows_jsonargparses_nesting():
    message = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lit_distill.modules.causal_lm.CausalLMModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'lit_distill.modules.SoftLabelDistillation':
        Parser key "loss":
          Does not validate against any of the Union subtypes
          Subtypes: [<class 'lit_distill.losses.DistillationLoss'>, <class 'NoneType'>]
          Errors:
            - Problem with given class_path 'lit_distill.losses.DistillationLoss':
                Parser key "temperature":
                  Expected a <class 'float'>. Got value: abc
            - Expected a <class 'NoneType'>
          Given value type: <class 'jsonargparse._util.NestedArg'>
          Given value: NestedArg(key='temperature', val='abc')
    - Expected a <class 'NoneType'>
  Given value type: <class 'jsonargparse._util.NestedArg'>
  Given value: NestedArg(key='loss.init_args.temperature', val='abc')"""
    assert concise_error(message) == "--model.init_args.loss.init_args.temperature: Expected a float. Got value: abc"
    assert concise_error("unrecognized arguments: --x 1") == "unrecognized arguments: --x 1"
    truncated = 'Parser key "model":\n  Does not validate against any of the Union subtypes'
    assert concise_error(truncated) == truncated  # a shape it does not know: the message as it is


@pytest.mark.parametrize("tokenizer", [[], ["--data.tokenizer", "null"]], ids=["config-tokenizer", "no-tokenizer"])
def test_a_missing_teacher_directory_says_to_run_the_teacher_config(workdir, tmp_path, monkeypatch, capsys, tokenizer):
    monkeypatch.chdir(tmp_path)  # configs/teacher.yaml has not run here
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))  # the bundled corpus's BPE is cached there
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(CONFIGS / "soft_label.yaml"), *QUICK, *tokenizer])
    assert info.value.code == 2
    err = capsys.readouterr().err
    what = "could not find the tokenizer" if not tokenizer else "could not load a causal LM from"
    assert f"{what} 'artifacts/teacher': there is no directory {tmp_path / 'artifacts' / 'teacher'}" in err
    assert "`lit-distill fit --config configs/teacher.yaml` writes it: run that first" in err
    assert "Hub or its local cache" not in err


def test_the_teachers_tokenizer_is_the_default(workdir, tmp_path, monkeypatch):
    """Without data.tokenizer, a teacher saved with its tokenizer tokenizes the data (not a BPE trained afresh)."""
    import gzip

    from lit_distill.data import BUNDLED_CORPUS

    corpus = tmp_path / "my.txt"
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        corpus.write_text(f.read()[:200_000])
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))
    cli = run_cli(
        ["fit", "--config", str(CONFIGS / "soft_label.yaml"), *QUICK, "--trainer.max_steps", "1",
         "--data.tokenizer", "null", "--data.files", f"[{corpus}]"]
    )  # fmt: skip
    teacher_tokenizer = AutoTokenizer.from_pretrained(workdir / "artifacts" / "teacher")
    assert cli.datamodule.tokenizer.get_vocab() == teacher_tokenizer.get_vocab()
    assert cli.trainer.global_step == 1


def test_a_tokenizer_that_is_not_the_teachers_is_an_error_naming_both(workdir, tmp_path, monkeypatch, capsys):
    other = permuted_tokenizer(workdir / "artifacts" / "teacher", tmp_path / "other-tokenizer")
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))
    with pytest.raises(SystemExit) as info:
        cli_main(["fit", "--config", str(CONFIGS / "soft_label.yaml"), *QUICK, "--data.tokenizer", str(other)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "is not the teacher's" in err and str(other) in err and "artifacts/teacher" in err


def test_fit_help_shows_the_technique_and_loss_options_in_one_step(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--model.init_args.loss.init_args.temperature",
        "--model.init_args.loss.init_args.divergence",
        "--model.init_args.mode",
        "--model.init_args.teacher_ce_weight",
        "--model.init_args.teacher TEACHER",
        "--trainer.max_steps",
        "--data.tokenizer",
    ):
        assert option in out, option
    assert "torch.nn.Conv2d" not in out and "--optimizer " not in out
    # was 572 with neither the techniques' nor the loss's options; 487 with six; 501 with the loss's label_weight
    # TextDataModule has prepared= and num_proc= since the corpora round, teacher_tokenizer= since cross-tokenizer
    assert len(out.splitlines()) < 540


def test_model_help_leaves_out_every_torch_module(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--model.help", "SoftLabelDistillation"])
    out = capsys.readouterr().out
    assert "--model.student" in out and "--model.teacher" in out
    assert "torch.nn.Conv2d" not in out and len(out.splitlines()) < 150  # was 1,011


def test_checkpoints_are_verified_with_any_plugins():
    class OtherIO(CheckpointIO):
        save_checkpoint = load_checkpoint = remove_checkpoint = None

    assert [type(p) for p in with_verified_checkpoints(None)] == [VerifiedCheckpointIO]
    torch_io = TorchCheckpointIO()
    (wrapped,) = with_verified_checkpoints([torch_io])
    assert isinstance(wrapped, VerifiedCheckpointIO) and wrapped.inner is torch_io
    other = OtherIO()
    assert with_verified_checkpoints(other) == [other]  # someone else's checkpoint IO is theirs

    class Strategy:
        _checkpoint_io = torch_io

    assert with_verified_checkpoints([], Strategy()) == []  # set on a strategy object: Lightning refuses a second


def test_prepare_then_fit_on_the_prepared_text_and_chat_data(workdir, monkeypatch, capsys):
    """docs/corpora.md's commands: prepare the bundled corpus and the dialogues with the teacher's tokenizer, then
    the soft-label configs train on the prepared directories (no tokenizing: the data module reads rows)."""
    chat_workdir(workdir, monkeypatch)
    text, chat = workdir / "artifacts" / "corpus-prepared", workdir / "artifacts" / "dialogues-prepared"
    assert cli_main(["prepare", "--data.tokenizer", "artifacts/teacher", "--output", str(text)]) == 0
    assert cli_main(
        ["prepare", "--data", "lit_distill.data.ChatDataModule", "--data.train", "artifacts/dialogues/train-head.jsonl",
         "--data.tokenizer", "artifacts/teacher", "--data.chat_template", "bundled", "--data.max_seq_length", "256",
         "--output", str(chat)]
    ) == 0  # fmt: skip
    assert "Train on it with --data.prepared" in capsys.readouterr().out
    cli = run_cli(["fit", "--config", str(CONFIGS / "soft_label.yaml"), *QUICK, "--data.prepared", str(text)])
    assert cli.trainer.global_step == 2 and cli.datamodule.prepared_dir == text
    assert len(cli.datamodule.train_set) == 4096 // 128  # max_train_tokens keeps the first rows
    chat_options = ["--data.train", "null", "--data.val", "null", "--data.prepared", str(chat)]
    cli = run_cli(
        ["fit", "--config", str(CONFIGS / "chat_soft_label.yaml"), *without(CHAT_QUICK, "--data.train"), *chat_options]
    )
    assert cli.trainer.global_step == 2 and cli.datamodule.describe()["train"]["conversations"] == 190
