"""The ``lit-distill demo`` command prints both backends' losses, and they agree."""

import re

import pytest

from lit_distill.cli import cli_main
from lit_distill.kernels import DIVERGENCES


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_demo_prints_matching_losses_for_every_divergence(capsys):
    cli_main(["demo", "--rows", "3", "--vocab", "700", "--temperature", "1.5"])
    out = capsys.readouterr().out
    assert "3 tokens x 700 vocab" in out
    for divergence in DIVERGENCES:
        line = next(line for line in out.splitlines() if line.startswith(divergence + " "))
        triton_loss, torch_loss, grad_diff = (float(x) for x in re.split(r"\s+", line)[1:4])
        assert triton_loss == pytest.approx(torch_loss, rel=1e-5)
        assert grad_diff < 1e-6


def test_demo_rejects_bad_sizes():
    with pytest.raises(SystemExit, match="--rows must be positive"):
        cli_main(["demo", "--rows", "0"])


def test_help_lists_the_demo(capsys):
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "demo" in capsys.readouterr().out
