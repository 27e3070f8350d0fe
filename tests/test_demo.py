"""The demo's pieces without a full run: help text, verdict, plot, curve recorder.

The demo end to end (``--quick``) runs in tests/test_cli.py.
"""

import argparse
import math

import pytest
import torch

from lit_distill.demo.main import _parser, _techniques
from lit_distill.demo.report import QUICK_NOTE, Row, _figure, report
from lit_distill.demo.training import _Curve, _evaluate


def test_help_is_plain_text():
    text = _parser().format_help()
    assert "``" not in text and ":func:" not in text
    for needle in ("smoke test", "LIT_DISTILL_CACHE", "XDG_CACHE_HOME", "default 250 (--quick: 30)"):
        assert needle in " ".join(text.split())


def _rows(alone: float, soft: float) -> list[Row]:
    return [
        Row("teacher", 4.6, math.exp(4.6), math.nan, math.nan, 1.0),
        Row("student: alone", alone, math.exp(alone), 0.5, 1000.0, 1.0),
        Row("student: soft-label", soft, math.exp(soft), 0.6, 500.0, 2.0),
    ]


@pytest.mark.parametrize(
    ("alone", "soft", "quick", "expected"),
    [
        (4.9285, 4.7307, False, "soft-label distillation beats training alone by 0.1978 nats/token"),
        (5.9381, 5.9527, True, "soft-label distillation trails training alone by 0.0146 nats/token"),
    ],
)
def test_verdict_has_no_double_negative_and_quick_says_smoke_test(tmp_path, capsys, alone, soft, quick, expected):
    curves = {"alone": [(10, alone + 1), (30, alone)], "soft-label": [(10, soft + 1), (30, soft)]}
    report(_rows(alone, soft), curves, {}, tmp_path, quick=quick)
    out = capsys.readouterr().out
    assert expected in out and "does not beat" not in out and "-0." not in out
    assert (QUICK_NOTE in out) == quick
    assert (QUICK_NOTE in (tmp_path / "results.md").read_text()) == quick
    assert (tmp_path / "validation_curves.png").stat().st_size > 0


def test_plot_integer_ticks_and_coinciding_curves_stay_visible():
    import matplotlib.pyplot as plt

    same = [(10, 6.44), (20, 6.11), (30, 5.95)]  # soft-label and co-distillation on top of each other
    curves = {
        "alone": [(10, 6.51), (20, 6.15), (30, 5.94)],
        "soft-label": same,
        "hard-label": [(10, 6.49), (20, 6.17), (30, 9.3)],
        "co-distillation": same,
    }
    fig = _figure(curves, _rows(5.94, 5.95))
    ax = fig.axes[0]
    assert list(ax.get_xticks()) == [10, 20, 30]
    lines = {line.get_label().split(":")[0]: line for line in ax.get_lines()}
    soft, co = lines["soft-label"], lines["co-distillation"]
    assert (soft.get_linestyle(), soft.get_linewidth()) != (co.get_linestyle(), co.get_linewidth())
    assert soft.get_marker() != co.get_marker()
    assert lines["alone"].get_label() == "alone: 5.940 at the end"
    plt.close(fig)

    many = {"alone": [(step, 6.0 - step / 1000) for step in range(5, 255, 5)]}
    fig = _figure(many, _rows(5.75, 5.75))
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) <= 12 and all(float(t).is_integer() for t in ticks)
    plt.close(fig)


class _Data:
    """The part of TextDataModule the evaluation reads."""

    def __init__(self, blocks: torch.Tensor, batch_size: int) -> None:
        self.val_blocks, self.batch_size = blocks, batch_size

    def setup(self) -> None:
        pass


class _Module:
    def __init__(self, student) -> None:
        self.student = student


class _Trainer:
    def __init__(self, global_step: int) -> None:
        self.global_step = global_step


def test_curve_measures_the_whole_split_draws_no_rng_and_leaves_the_last_point_to_the_table():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=1
    )
    model = LlamaForCausalLM(config).train()
    data = _Data(torch.randint(0, 300, (70, 12)), batch_size=4)  # 70 rows: a last batch of 2, and of 6 at 64
    curve = _Curve(data, max_steps=30)
    rng = torch.get_rng_state()
    curve.on_validation_epoch_end(_Trainer(10), _Module(model))
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training  # back to training mode
    curve.on_validation_epoch_end(_Trainer(30), _Module(model))  # the table's evaluation gives the last point
    assert [step for step, _ in curve.points] == [10]
    model.eval()
    expected, _ = _evaluate(model, data)  # the table's batches
    assert curve.points[0][1] == pytest.approx(expected, rel=1e-6)


def test_techniques_take_dashes_for_spaces_and_refuse_unknown_names():
    assert _techniques("alone, offline-top-k,on-policy") == ("alone", "offline top-k", "on-policy")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown technique"):
        _techniques("alone,distill")


def test_verdict_compares_the_on_policy_students_sample_scores(tmp_path, capsys):
    rows = [
        *_rows(4.93, 4.73),
        Row("student: on-policy", 4.80, math.exp(4.8), 0.6, 400.0, 3.0, 3.9, 0.2),
    ]
    rows[2].teacher_nll_of_samples = 4.05
    report(rows, {}, {}, tmp_path)
    out = capsys.readouterr().out
    assert "on-policy: the teacher's NLL of its samples 3.900 against 4.050 for soft-label" in out
    assert "validation loss +0.1300 nats against training alone" in out


def test_the_cached_teacher_is_reused_whatever_the_students_sizes(tmp_path, capsys):
    """The teacher's cache key leaves the students' sizes out: another --student-steps reuses it."""
    from lit_distill.data import TextDataModule
    from lit_distill.demo.main import PRESETS
    from lit_distill.demo.training import cached_teacher

    sizes = {**PRESETS["quick"], "teacher_steps": 2, "val_every": 2, "max_train_tokens": 4096}
    data = TextDataModule(vocab_size=sizes["vocab_size"], seq_len=sizes["seq_len"], batch_size=2,
                          cache_dir=str(tmp_path), max_train_tokens=4096)  # fmt: skip
    ns = argparse.Namespace(seed=0, retrain_teacher=False)
    first, _ = cached_teacher(data, sizes, ns, tmp_path, tmp_path / "out")
    again, _ = cached_teacher(data, {**sizes, "student_steps": 99, "student_hidden": 8}, ns, tmp_path, tmp_path / "out")
    other, _ = cached_teacher(data, {**sizes, "teacher_steps": 3}, ns, tmp_path, tmp_path / "out")
    out = capsys.readouterr().out
    assert out.count("teacher: reusing") == 1 and again.name_or_path == first.name_or_path != other.name_or_path
