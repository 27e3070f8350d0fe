"""FSDP and DeepSpeed ZeRO on two CPU processes (gloo): one optimizer step equals one process's, the teacher is
sharded, a frozen teacher stays out of the optimizer, ExportModel writes the full weights, and a run resumed
from a checkpoint continues exactly. Also: the multi-GPU example configs parse.

The DeepSpeed tests need ``pip install deepspeed`` (not a dependency of the project) and are skipped without it."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml
from helpers import accumulation_batch, build, make_module
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy

from lit_distill.cli import cli_main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
HERE = Path(__file__).parent
CONFIGS = HERE.parent / "configs"
LAYERS = 2  # decoder layers of each tiny model (helpers.TINY)
needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available",
)


needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install deepspeed)"
)


def run(technique: str, kind: str, out: Path, option: str = "", worker: str = "sharded_worker.py") -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(HERE / worker), technique, kind, str(out), *filter(None, [option])],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=HERE,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The one-process reference of a technique (and teacher dtype), computed once."""
    cache = {}

    def get(technique: str, dtype: str = "") -> dict:
        if (technique, dtype) not in cache:
            out = tmp_path_factory.mktemp("single") / "single.pt"
            cache[technique, dtype] = run(technique, "single", out, dtype)
        return cache[technique, dtype]

    return get


def assert_same_step(sharded: dict, single: dict) -> None:
    assert sharded["loss"] == pytest.approx(single["loss"], rel=1e-5)
    assert sharded["val_loss"] == pytest.approx(single["val_loss"], rel=1e-5)
    for key, delta in single["delta"].items():
        torch.testing.assert_close(sharded["delta"][key], delta, rtol=1e-4, atol=1e-6, msg=key)
    assert any(bool((d != 0).any()) for k, d in single["delta"].items() if k.startswith("student."))
    assert sharded["export_diff"] == 0.0  # ExportModel wrote the gathered weights (a co-trained teacher too)


def assert_teacher_sharded(sharded: dict) -> None:
    stored = [rank["teacher_stored"] for rank in sharded["ranks"]]
    assert len(stored) == 2 and all(0 < s < sharded["teacher_numel"] for s in stored), stored
    assert sum(stored) >= sharded["teacher_numel"]
    assert all(rank["units"] == 1 + 2 * LAYERS for rank in sharded["ranks"])  # a unit per decoder layer + root


@pytest.mark.distributed
@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize("kind", ["fsdp", "fsdp2"])
@pytest.mark.parametrize("technique", ["soft", "hard-argmax", "hard-generate", "co", "on-policy"])
def test_sharded_step_equals_one_process(tmp_path, single, kind, technique):
    reference = single(technique)
    sharded = run(technique, kind, tmp_path / f"{kind}.pt")
    assert_same_step(sharded, reference)
    assert_teacher_sharded(sharded)
    n_student, n_teacher = sharded["parameters"]["student"], sharded["parameters"]["teacher"]
    for rank in sharded["ranks"]:
        assert rank["student_in_optimizer"] == n_student
        assert rank["student_with_state"] > 0 and rank["student_with_grad"] > 0
        if technique == "co":  # the teacher trains: in the optimizer, with gradients and state
            assert rank["teacher_in_optimizer"] == n_teacher
            assert rank["teacher_with_state"] > 0 and rank["teacher_with_grad"] > 0
        else:  # frozen: no gradients, no optimizer state, unchanged
            assert rank["teacher_in_optimizer"] == rank["teacher_with_state"] == rank["teacher_with_grad"] == 0
    teacher_moved = any(bool((d != 0).any()) for k, d in sharded["delta"].items() if k.startswith("teacher."))
    assert teacher_moved == (technique == "co")


@pytest.mark.distributed
@pytest.mark.slow
@needs_gloo
def test_fsdp2_shards_a_bfloat16_teacher_with_a_float32_student(tmp_path, single):
    # FSDP1 cannot: it flattens both models' embeddings and heads into one buffer of one dtype.
    sharded = run("soft", "fsdp2", tmp_path / "fsdp2.pt", "bf16")
    assert_same_step(sharded, single("soft", "bf16"))
    assert_teacher_sharded(sharded)


@pytest.mark.distributed
@pytest.mark.slow
@needs_gloo
@pytest.mark.parametrize(
    ("technique", "kind"),
    [
        ("soft", "fsdp2"),  # a directory of shards (save_distributed_checkpoint=True, the default)
        ("soft", "fsdp2-full"),  # one file
        ("co", "fsdp2"),
        ("soft", "fsdp"),  # FSDP1, state_dict_type="sharded"
        pytest.param(
            "soft",
            "fsdp-full",
            marks=pytest.mark.skip(
                reason="FSDP1's full state dict (Lightning's default) offloads to CPU, which segfaults when the"
                " parameters are already on the CPU; GPU runs are unaffected"
            ),
        ),
    ],
)
def test_resumed_sharded_run_continues_exactly(tmp_path, technique, kind):
    """2 steps in one run equal 1 step, a checkpoint, and 1 step resumed from it (weights and momentum)."""
    assert_resumed_exactly(run(technique, kind, tmp_path / "resume.pt", "resume"))


def assert_resumed_exactly(result: dict) -> None:
    assert result["steps_run"] == 1  # the resumed run started from step 1
    for name in ("student", "teacher"):
        uninterrupted, resumed = result["uninterrupted"][name], result["resumed"][name]
        assert uninterrupted.keys() == resumed.keys()
        for key, value in uninterrupted.items():
            torch.testing.assert_close(resumed[key], value, rtol=1e-6, atol=1e-7, msg=f"{name}.{key}")


def test_sharded_strategies_refuse_to_skip_nonfinite_batches():
    module = make_module("soft", on_nonfinite="skip")
    module.trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False)
    with pytest.raises(ValueError, match="on_nonfinite='skip' works on one process or with DDP, not with Model"):
        module.setup("fit")


@pytest.mark.distributed
@pytest.mark.slow
@needs_gloo
@needs_deepspeed
@pytest.mark.parametrize(("technique", "stage"), [("soft", 2), ("soft", 3), ("co", 3), ("hard-generate", 3)])
def test_deepspeed_step_equals_one_process(tmp_path, single, technique, stage):
    """The loss normalized in training_step (DeepSpeed holds the gradients): one process's step, uneven padding."""
    sharded = run(technique, f"ds{stage}", tmp_path / "ds.pt", worker="deepspeed_worker.py")
    assert_same_step(sharded, single(technique))


@pytest.mark.distributed
@pytest.mark.slow
@needs_gloo
@needs_deepspeed
def test_deepspeed_step_with_accumulation_is_the_mean_of_micro_batch_means(tmp_path):
    sharded = run("soft", "ds3", tmp_path / "ds.pt", "accumulate", worker="deepspeed_worker.py")
    module, batch = build("soft"), accumulation_batch()
    means = [module.distill({k: v[rows] for k, v in batch.items()}) for rows in (slice(0, 4), slice(4, 8))]
    (sum(out.loss / out.num_tokens for out in means) / 2).backward()
    for key, p in module.student.named_parameters():  # SGD's first step, at lr 1
        torch.testing.assert_close(sharded["delta"][f"student.{key}"], p.grad, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.distributed
@pytest.mark.slow
@needs_gloo
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_resumed_deepspeed_run_continues_exactly(tmp_path, stage):
    """With exclude_frozen_parameters: the checkpoint has no teacher, and loading lets it be missing."""
    assert_resumed_exactly(run("soft", f"ds{stage}", tmp_path / "resume.pt", "resume", worker="deepspeed_worker.py"))


def build_strategy(value: str | dict) -> Strategy:
    """A trainer's ``strategy`` value from YAML, built the way LightningCLI builds it."""
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=str | Strategy)  # the Trainer's annotation
    return parser.instantiate(parser.parse_object({"strategy": value})).strategy


@pytest.mark.parametrize(
    ("config", "strategy"),
    [("fsdp_example.yaml", "ModelParallelStrategy"), ("deepspeed_example.yaml", "DeepSpeedStrategy")],
)
def test_multi_gpu_example_configs_parse(capsys, config, strategy):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    printed = yaml.safe_load(out[out.index("# lightning") :])  # DeepSpeed, if installed, logs a line to stdout
    assert printed["trainer"]["strategy"]["class_path"].endswith(strategy)
    assert printed["model"]["init_args"]["teacher"]["init_args"]["name_or_path"] == "meta-llama/Llama-3.1-70B"


def test_fsdp_example_strategies_build():
    built = build_strategy(yaml.safe_load((CONFIGS / "fsdp_example.yaml").read_text())["trainer"]["strategy"])
    assert isinstance(built, ModelParallelStrategy)
    assert (built._data_parallel_size, built._tensor_parallel_size) == (8, 1)
    # The FSDP1 alternative the config's comment gives, as the tests' worker runs it.
    fsdp1 = {
        "class_path": "lightning.pytorch.strategies.FSDPStrategy",
        "init_args": {
            "auto_wrap_policy": ["transformers.models.llama.modeling_llama.LlamaDecoderLayer"],
            "state_dict_type": "sharded",
        },
    }
    built = build_strategy(fsdp1)
    assert isinstance(built, FSDPStrategy)
    assert built._state_dict_type == "sharded"
    assert built.kwargs["use_orig_params"] is True
    assert {c.__name__ for c in built.kwargs["auto_wrap_policy"]._module_classes} == {"LlamaDecoderLayer"}


@needs_gloo
@pytest.mark.parametrize("succeeds", [True, False])
def test_the_command_closes_its_process_group_after_a_successful_run(tmp_path, monkeypatch, succeeds):
    """Lightning leaves the group open, and a Gloo group left to the interpreter's exit can abort a finished run;
    after an error the group stays (another rank may be inside a collective)."""

    def run_cli(args):
        if not succeeds:
            raise RuntimeError("the run failed")

    monkeypatch.setattr("lit_distill.cli.lightning_cli.run_cli", run_cli)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        if succeeds:
            assert cli_main(["fit"]) == 0
        else:
            with pytest.raises(RuntimeError, match="the run failed"):
                cli_main(["fit"])
        assert torch.distributed.is_initialized() is not succeeds
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
