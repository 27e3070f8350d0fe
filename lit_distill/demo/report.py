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
    bits_per_byte: float = math.nan  # on the held-out works: compares students of different tokenizers


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
    bits_per_byte: bool = True  # the ``bits/byte`` column (the chat demo's losses are on the assistant tokens)


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
    bits = f" {'bits/byte':>9}" if layout.bits_per_byte else ""
    header = (
        f"{'model':<28} {'val loss':>9} {'val ppl':>9}{bits} {'agreement':>10} {'tch NLL':>8} {'rev KL':>7}"
        f" {'tokens/s':>9}{waits} {'wall s':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        speed = "cached" if math.isnan(r.tokens_per_sec) else f"{r.tokens_per_sec:,.0f}"
        wait = f" {_blank(getattr(r, 'data_wait_fraction', math.nan), 3):>9}" if layout.data_wait else ""
        per_byte = f" {_blank(r.bits_per_byte, 4):>9}" if layout.bits_per_byte else ""
        lines.append(
            f"{r.model:<28} {r.val_loss:>9.4f} {r.val_ppl:>9.2f}{per_byte} {_blank(r.agreement, 3):>10}"
            f" {_blank(r.teacher_nll_of_samples, 3):>8} {_blank(r.reverse_kl_on_samples, 3):>7} {speed:>9}{wait}"
            f" {r.wall_seconds:>8.1f}"
        )
    cross = [r.model for r in rows if r.model.removeprefix("student: ") in OTHER_TOKENIZER]
    table = "\n".join([*lines, *notes, layout.sample_note, *([OTHER_TOKENIZER_NOTE] if cross else [])])
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


def _blank(value: float, digits: int) -> str:
    """``value`` with ``digits`` decimals, or nothing for ``nan`` (not measured)."""
    return "" if math.isnan(value) else f"{value:.{digits}f}"


#: the students with their own tokenizer (``cross_tokenizer.py``): their val loss is per token of that tokenizer,
#: so they compare with the others in bits per byte only (and stay off the plot, whose scale is nats per token)
OTHER_TOKENIZER = ("own-tokenizer alone", "cross-tokenizer")
OTHER_TOKENIZER_NOTE = (
    "own-tokenizer alone, cross-tokenizer: students with their own tokenizer (a SentencePiece-style BPE with byte"
    " fallback, 2048 tokens); val loss and ppl are per token of that tokenizer, so compare them in bits/byte (the"
    " held-out works' NLL per UTF-8 byte, in bits); the teacher cannot score their samples token by token"
)


def _verdict(rows: list[Row]) -> str:
    """How each technique compares with training alone and with online soft labels (those that ran)."""
    by_name = {r.model: r for r in rows}
    alone, soft = by_name.get("student: alone"), by_name.get("student: soft-label")
    if alone is None or soft is None:
        return "(the verdict compares with the students trained alone and with soft labels: run both)" + (
            cross_verdict(rows)
        )
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
    return verdict + cross_verdict(rows)


def cross_verdict(rows) -> str:
    """The students of another tokenizer in bits per byte: the cross-tokenizer student's gain on the one trained
    alone, and the share it recovers of the soft-label student's gain on the same-tokenizer student alone."""
    by_name = {r.model.removeprefix("student: "): r for r in rows}
    own, cross = by_name.get("own-tokenizer alone"), by_name.get("cross-tokenizer")
    if own is None or cross is None:
        return ""
    gain = own.bits_per_byte - cross.bits_per_byte
    verdict = (
        f"\ncross-tokenizer: {cross.bits_per_byte:.4f} bits/byte against {own.bits_per_byte:.4f} for the same"
        f" student trained alone on its own tokenizer ({gain:+.4f})"
    )
    alone, soft = by_name.get("alone"), by_name.get("soft-label")
    if alone is not None and soft is not None:
        same = alone.bits_per_byte - soft.bits_per_byte
        share = gain / same if same > 0 and not math.isnan(gain) else math.nan
        verdict += f"; soft-label's gain with the teacher's tokenizer: {same:+.4f} bits/byte"
        if not math.isnan(share):
            verdict += f" (the cross-tokenizer student recovers {share:.0%} of it)"
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
        if points and name not in OTHER_TOKENIZER:
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
