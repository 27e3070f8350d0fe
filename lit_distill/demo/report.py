"""The demo's results: the table (printed and written as ``results.md`` and ``results.json``) and the plot."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

SAMPLE_NOTE = (
    "tch NLL, rev KL: each model continues the first half of 64 held-out sequences (sampling at T=1, the same"
    " seed for all); the teacher's mean NLL of those tokens and the mean reverse KL(model || teacher) there"
)
QUICK_NOTE = (
    "--quick is a smoke test of the pipeline: its models are too small and trained too briefly to show the "
    "distillation gain (run without --quick for that)"
)


@dataclass
class Row:
    """One model's line of the table; ``nan`` marks an agreement without a teacher and a cached model's speed."""

    model: str
    val_loss: float
    val_ppl: float
    agreement: float
    tokens_per_sec: float
    wall_seconds: float
    teacher_nll_of_samples: float = math.nan
    reverse_kl_on_samples: float = math.nan


@dataclass
class WaitRow(Row):
    """A row that also gives the share of the training time spent waiting for data (``nan``: not trained)."""

    data_wait_fraction: float = math.nan


@dataclass(frozen=True)
class Layout:
    """What differs between the demos' reports: the verdict, the note under the table, the plot's baseline curve
    and labels, and whether the table has a ``data wait`` column (of :class:`WaitRow`)."""

    verdict: Callable[[list[Row]], str]
    sample_note: str = SAMPLE_NOTE
    baseline: str = "alone"
    title: str = "lit-distill demo: students of the same size and steps"
    ylabel: str = "cross-entropy on held-out works (nats/token)"
    data_wait: bool = False


def report(
    rows: list[Row],
    curves: dict,
    sizes: dict,
    out: Path,
    quick: bool = False,
    notes: list[str] = (),
    layout: Layout | None = None,
) -> None:
    """Print the table, ``notes`` (the teacher caches) and the verdict; write ``results.md``, ``results.json``
    and the plot to ``out``. ``layout``: the main demo's by default."""
    layout = layout or MAIN
    waits = f" {'data wait':>9}" if layout.data_wait else ""
    header = (
        f"{'model':<28} {'val loss':>9} {'val ppl':>9} {'agreement':>10} {'tch NLL':>8} {'rev KL':>7}"
        f" {'tokens/s':>9}{waits} {'wall s':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        agreement = "" if math.isnan(r.agreement) else f"{r.agreement:.3f}"
        speed = "cached" if math.isnan(r.tokens_per_sec) else f"{r.tokens_per_sec:,.0f}"
        wait = ""
        if layout.data_wait:
            fraction = getattr(r, "data_wait_fraction", math.nan)
            wait = f" {'' if math.isnan(fraction) else f'{fraction:.3f}':>9}"
        lines.append(
            f"{r.model:<28} {r.val_loss:>9.4f} {r.val_ppl:>9.2f} {agreement:>10} {r.teacher_nll_of_samples:>8.3f}"
            f" {r.reverse_kl_on_samples:>7.3f} {speed:>9}{wait} {r.wall_seconds:>8.1f}"
        )
    table = "\n".join([*lines, *notes, layout.sample_note])
    print("\n" + table)
    verdict = layout.verdict(rows)
    if quick:
        verdict += f"\n{QUICK_NOTE}"
    print(verdict)
    (out / "results.md").write_text(f"```\n{table}\n```\n\n{verdict}\n\nsizes: {sizes}\n")
    (out / "results.json").write_text(
        json.dumps({"rows": [asdict(r) for r in rows], "curves": curves, "sizes": sizes}, indent=2)
    )
    png = _plot(curves, rows, out / "validation_curves.png", layout)
    print(
        f"wrote {out / 'results.md'}, {out / 'results.json'}"
        + (f", {png}" if png else "")
        + f"; TensorBoard logs: tensorboard --logdir {out / 'tensorboard'}"
    )


def _verdict(rows: list[Row]) -> str:
    """How each technique compares with training alone and with online soft labels (those that ran)."""
    by_name = {r.model: r for r in rows}
    alone, soft = by_name.get("student: alone"), by_name.get("student: soft-label")
    if alone is None or soft is None:
        return "(the verdict compares with the students trained alone and with soft labels: run both)"
    gain = alone.val_loss - soft.val_loss
    verdict = (
        f"soft-label distillation {'beats' if gain > 0 else 'trails'} training alone by {abs(gain):.4f} "
        "nats/token of validation loss"
    )
    on_policy = by_name.get("student: on-policy")
    if on_policy is not None:
        verdict += (
            f"\non-policy: the teacher's NLL of its samples {on_policy.teacher_nll_of_samples:.3f} against"
            f" {soft.teacher_nll_of_samples:.3f} for soft-label; validation loss"
            f" {alone.val_loss - on_policy.val_loss:+.4f} nats against training alone"
        )
    for r in rows:
        if r.model.startswith("student: offline"):
            verdict += (
                f"\n{r.model[len('student: ') :]}: {alone.val_loss - r.val_loss:+.4f} nats against training alone,"
                f" {r.val_loss - soft.val_loss:+.4f} against online soft-label, at"
                f" {r.tokens_per_sec / soft.tokens_per_sec:.2f}x its tokens/s"
            )
    return verdict


MAIN = Layout(verdict=_verdict)

# Curves can coincide (soft-label and co-distillation while the co-distilled teacher barely moves, as with
# --quick): soft-label is a wide translucent band, co-distillation a thin dashed line drawn over it.
_STYLES = {
    "alone": {"linestyle": "-", "marker": "o", "markersize": 4},
    "SFT": {"linestyle": "-", "marker": "o", "markersize": 4},  # the chat demo's baseline
    "soft-label": {"linestyle": "-", "linewidth": 5, "alpha": 0.4, "marker": "s", "markersize": 8},
    "hard-label": {"linestyle": ":", "linewidth": 2, "marker": "^", "markersize": 5},
    "co-distillation": {"linestyle": "--", "linewidth": 1.5, "marker": "D", "markersize": 4},
    "on-policy": {"linestyle": "-", "linewidth": 1.5, "marker": "P", "markersize": 5},
    "offline top-k": {"linestyle": "-.", "linewidth": 1.5, "marker": "v", "markersize": 4},
    "offline sampled": {"linestyle": "-.", "linewidth": 1.5, "marker": "x", "markersize": 5},
}


def _plot(curves: dict, rows: list[Row], path: Path, layout: Layout | None = None) -> Path | None:
    """Writes the validation curves to ``path``; None when matplotlib cannot be imported."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = _figure(curves, rows, layout)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _figure(curves: dict, rows: list[Row], layout: Layout | None = None):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layout = layout or MAIN
    fig, ax = plt.subplots(figsize=(7, 4.5))
    teacher = next(r for r in rows if r.model == "teacher")
    # Scale to the student trained alone (the chat demo's SFT student): a curve far above it (hard labels can be)
    # is named, not drawn flat.
    baseline = [v for _, v in curves.get(layout.baseline, [])] or [teacher.val_loss]
    top = max(baseline) + 0.5
    steps = sorted({step for points in curves.values() for step, _ in points})
    for name, points in curves.items():
        if points:
            end = points[-1][1]
            off = min(v for _, v in points) > top
            ax.plot(
                *zip(*points, strict=True),
                **_STYLES.get(name, {"marker": "o"}),
                label=f"{name} (above the chart: {end:.2f} at the end)" if off else f"{name}: {end:.3f} at the end",
            )
    ax.axhline(teacher.val_loss, color="gray", linestyle="--", label=f"teacher (final): {teacher.val_loss:.3f}")
    ax.set_ylim(min(teacher.val_loss, *baseline) - 0.2, top)
    if 0 < len(steps) <= 12:
        ax.set_xticks(steps)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(layout.ylabel)
    ax.set_title(layout.title)
    ax.legend(title="whole held-out split (last point = the table)", title_fontsize="small", fontsize="small")
    fig.tight_layout()
    return fig
