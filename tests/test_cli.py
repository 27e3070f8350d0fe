"""The ``lit-distill`` command: every shipped config parses and trains a few steps, overrides, the demo."""

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_distill.cli import cli_main
from lit_distill.kernels import DIVERGENCES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning", "ignore::RuntimeWarning")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUICK = [
    "--trainer.max_steps", "2", "--trainer.val_check_interval", "1", "--trainer.limit_val_batches", "1",
    "--trainer.enable_progress_bar", "false", "--data.batch_size", "2", "--data.max_train_tokens", "4096",
]  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory where configs/teacher.yaml has run (it exports artifacts/teacher)."""
    path = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(path)
        mp.setenv("LIT_DISTILL_CACHE", str(path / "cache"))
        cli_main(["fit", "--config", str(CONFIGS / "teacher.yaml"), *QUICK])
    return path


@pytest.mark.parametrize(
    ("config", "student_dir"),
    [
        ("soft_label.yaml", "student-soft-label"),
        ("hard_label_argmax.yaml", "student-hard-label"),
        ("hard_label_generate.yaml", "student-hard-label-generate"),
        ("co_distillation.yaml", "student-co-distillation"),
    ],
)
def test_every_config_trains_a_few_steps_and_exports(workdir, monkeypatch, config, student_dir):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))
    cli = cli_main(["fit", "--config", str(CONFIGS / config), *QUICK])
    assert cli.trainer.global_step == 2
    assert cli.model.student.config.vocab_size == cli.datamodule.vocab_size  # linked from the data module
    student = AutoModelForCausalLM.from_pretrained(workdir / "artifacts" / student_dir)
    assert student.config.hidden_size == 96
    if config == "co_distillation.yaml":
        assert (workdir / "artifacts" / "teacher-co-distillation" / "config.json").exists()


def test_ctrl_c_saves_a_checkpoint_the_command_line_resumes_from(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))
    interrupt = '{"class_path": "test_faults.InterruptAt", "init_args": {"step": 1}}'
    args = ["fit", "--config", str(CONFIGS / "soft_label.yaml"), *QUICK, "--trainer.max_steps", "3"]
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args, f"--trainer.callbacks+={interrupt}"])
    assert exit_info.value.code == 1
    saved = sorted(workdir.glob("**/checkpoints/interrupted.ckpt"), key=lambda p: p.stat().st_mtime)[-1]
    assert torch.load(saved, weights_only=False)["global_step"] == 2  # step 1 finished, then saved
    cli = cli_main([*args, "--ckpt_path", str(saved)])
    assert cli.trainer.ckpt_path == str(saved) and cli.trainer.global_step == 3


def test_teacher_config_exported_the_teacher_and_tokenizer(workdir):
    assert (workdir / "artifacts" / "teacher" / "config.json").exists()
    assert (workdir / "artifacts" / "teacher" / "tokenizer.json").exists()


def test_command_line_overrides(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setenv("LIT_DISTILL_CACHE", str(workdir / "cache"))
    cli = cli_main(
        [
            "fit",
            "--config",
            str(CONFIGS / "soft_label.yaml"),
            *QUICK,
            "--model.init_args.loss.init_args.temperature",
            "3",
            "--trainer.max_steps",
            "1",
        ]
    )
    assert cli.model.loss.temperature == 3.0 and cli.trainer.global_step == 1


def test_gpu_example_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "hf_example.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "meta-llama/Llama-3.1-8B" in printed and "SoftLabelDistillation" in printed


def test_every_config_is_covered():
    tested = {
        "teacher.yaml",
        "soft_label.yaml",
        "hard_label_argmax.yaml",
        "hard_label_generate.yaml",
        "co_distillation.yaml",
        "hf_example.yaml",
        "fsdp_example.yaml",  # parsed in test_sharded.py
        "deepspeed_example.yaml",  # parsed in test_sharded.py
    }
    assert {p.name for p in CONFIGS.glob("*.yaml")} == tested


def test_unknown_config_key_is_lightnings_error(workdir, monkeypatch, capsys):
    monkeypatch.chdir(workdir)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(CONFIGS / "soft_label.yaml"), "--model.init_args.no_such_option", "1"])
    assert "no_such_option" in capsys.readouterr().err


def test_help_lists_the_techniques(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = capsys.readouterr().out
    for name in ("SoftLabelDistillation", "HardLabelDistillation", "CoDistillation", "demo"):
        assert name in out


def test_demo_quick_writes_table_logs_and_plot(tmp_path, capsys):
    cli_main(["demo", "--quick", "--out", str(tmp_path / "demo"), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    for row in ("teacher", "student: alone", "student: soft-label", "student: hard-label", "student: co-distillation"):
        assert row in out
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert len(results["rows"]) == 5 and all(r["val_loss"] > 0 for r in results["rows"])
    assert (tmp_path / "demo" / "validation_curves.png").stat().st_size > 0
    assert list((tmp_path / "demo" / "tensorboard").rglob("events.out.tfevents.*"))
    # a second run reuses the cached teacher
    cli_main(["demo", "--quick", "--out", str(tmp_path / "demo2"), "--cache-dir", str(tmp_path / "cache")])
    assert "teacher: reusing" in capsys.readouterr().out


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
