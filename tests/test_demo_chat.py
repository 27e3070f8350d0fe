"""``lit-distill demo --chat --quick`` end to end (one run shared by the tests), checked against independent
computations: one initialization, the loss on assistant tokens only, the main demo's tokenizer, the results."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lit_distill.data.chat_template import BUNDLED_CHAT_TEMPLATE
from lit_distill.demo.chat import CHAT_PRESETS, chat_data, chat_teacher
from lit_distill.demo.chat_students import CHAT_TECHNIQUES
from lit_distill.demo.main import _parser, demo_main

STUDENTS = [f"student: {name}" for name in CHAT_TECHNIQUES]


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--chat --quick`` run with a fresh cache (``LIT_DISTILL_CACHE``); every fit's module and the student's
    weights as the fit starts."""
    from lightning.pytorch import Trainer

    root = tmp_path_factory.mktemp("chat-demo")
    fits = []
    fit = Trainer.fit

    def recording_fit(trainer, module, *args, **kwargs):
        fits.append((module, {k: v.clone() for k, v in module.student.state_dict().items()}, args[0]))
        return fit(trainer, module, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIT_DISTILL_CACHE", str(root / "cache"))
        patch.setattr(Trainer, "fit", recording_fit)
        rows = demo_main(["--chat", "--quick", "--out", str(root / "out"), "--student-seed", "3"])
    return SimpleNamespace(rows=rows, fits=fits, cache=root / "cache", out=root / "out")


@pytest.mark.slow
def test_every_row_is_there_with_finite_numbers_and_the_results_files_say_the_same(quick_run):
    rows = quick_run.rows
    assert [r.model for r in rows] == ["teacher", *STUDENTS]
    for r in rows:
        numbers = (r.val_loss, r.val_ppl, r.teacher_nll_of_samples, r.reverse_kl_on_samples, r.wall_seconds)
        assert all(math.isfinite(x) and x >= 0 for x in numbers), r
        assert r.val_ppl == pytest.approx(math.exp(r.val_loss))
        assert 0 < r.tokens_per_sec < math.inf and 0 <= r.data_wait_fraction < 1  # the teacher was trained here
    assert rows[0].reverse_kl_on_samples == 0  # the teacher's replies scored by itself
    assert all(0 <= r.agreement <= 1 and r.reverse_kl_on_samples > 0 for r in rows[1:])
    saved = json.loads((quick_run.out / "results.json").read_text())
    assert [r["model"] for r in saved["rows"]] == [r.model for r in rows]
    for written, r in zip(saved["rows"], rows, strict=True):
        assert written.keys() == vars(r).keys()
        assert all(_same(written[k], v) for k, v in vars(r).items()), (written, r)
    assert {name: curve[-1] for name, curve in saved["curves"].items()} == {
        name: [CHAT_PRESETS["quick"]["student_steps"], r.val_loss]
        for name, r in zip(CHAT_TECHNIQUES, rows[1:], strict=True)
    }
    table = (quick_run.out / "results.md").read_text()
    for r in rows:
        line = next(line for line in table.splitlines() if line.startswith(r.model))
        numbers = (f"{r.val_loss:.4f}", f"{r.teacher_nll_of_samples:.3f}", f"{r.reverse_kl_on_samples:.3f}")
        assert line.split()[len(r.model.split()) :] == [
            *numbers[:1], f"{r.val_ppl:.2f}", *([f"{r.agreement:.3f}"] if r.model != "teacher" else []),
            *numbers[1:], f"{r.tokens_per_sec:,.0f}", f"{r.data_wait_fraction:.3f}", f"{r.wall_seconds:.1f}",
        ]  # fmt: skip
    assert "data wait" in table.splitlines()[1]
    assert "soft-label distillation" in table and "SFT alone" in table
    assert (quick_run.out / "validation_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_the_students_start_from_one_initialization(quick_run):
    starts = {type(module).__name__: weights for module, weights, _ in quick_run.fits[-3:]}
    assert list(starts) == ["LanguageModelTraining", "SoftLabelDistillation", "OnPolicyDistillation"]
    first, *others = starts.values()
    for weights in others:
        assert weights.keys() == first.keys() and all(torch.equal(weights[k], first[k]) for k in first)
    # not the teacher's weights: a student of its own size
    teacher = quick_run.fits[-4][0].student
    assert sum(p.numel() for p in teacher.parameters()) > sum(w.numel() for w in first.values())


@pytest.mark.slow
def test_the_sft_students_validation_loss_counts_the_assistant_tokens_alone(quick_run):
    import torch.nn.functional as F

    sft, _, chat = quick_run.fits[-3]
    model = sft.student.eval()
    tokenizer = chat.tokenizer
    template = BUNDLED_CHAT_TEMPLATE.read_text()
    seq_len = CHAT_PRESETS["quick"]["seq_len"]
    total, counted, everything = 0.0, 0, []
    for line in Path(chat.val).read_text().splitlines():
        messages = json.loads(line)["messages"]
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        reply = tokenizer(messages[-1]["content"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        assert ids[-len(reply) :] == reply  # the reply and its EOS end the conversation, in tokens of their own
        start = len(ids) - len(reply)
        ids = ids[:seq_len]  # the demo keeps a conversation's first seq_len tokens
        if start >= len(ids):
            continue  # its reply is cut off: nothing to learn, the data drops it
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        targets = torch.tensor(ids[1:])
        losses = F.cross_entropy(logits, targets, reduction="none")
        total += losses[start - 1 :].sum().item()  # position t predicts token t + 1: the reply's tokens only
        counted += len(ids) - start
        everything.append(losses)
    sft_row = quick_run.rows[1]
    assert sft_row.val_loss == pytest.approx(total / counted, rel=2e-5)
    assert abs(torch.cat(everything).mean().item() - sft_row.val_loss) > 0.005  # every token's would differ


@pytest.mark.slow
def test_the_main_demos_tokenizer_is_unchanged_and_the_chat_teacher_is_cached(quick_run, capsys):
    from transformers import AutoTokenizer

    from lit_distill.data.tokenizers import PAD

    (main,) = (quick_run.cache / "tokenizers").glob("bpe-*")  # the main demo's BPE, trained by this run
    ours = AutoTokenizer.from_pretrained(main)
    chat = quick_run.fits[-1][2]
    assert chat.tokenizer.get_vocab() == ours.get_vocab() and len(chat.tokenizer) == len(ours)
    assert chat.tokenizer.special_tokens_map == ours.special_tokens_map and ours.pad_token == PAD
    assert chat.tokenizer.chat_template is None  # the template is given per call, never saved into it
    base, chat_tuned = quick_run.fits[0][0].student, quick_run.fits[1][0].student
    assert base.config.vocab_size == chat_tuned.config.vocab_size == len(ours)
    # a second run finds the fine-tuned teacher where the first left it, and measures it alike
    ns = _parser().parse_args(["--chat", "--quick", "--student-seed", "3", "--cache-dir", str(quick_run.cache)])
    sizes = CHAT_PRESETS["quick"]
    data, prompts = chat_data(ours, sizes, quick_run.cache)
    _, row = chat_teacher(base, data, prompts, sizes, ns, quick_run.cache, quick_run.out)
    assert "chat teacher: reusing" in capsys.readouterr().out
    assert row.val_loss == pytest.approx(quick_run.rows[0].val_loss, rel=1e-6)


def test_chat_refuses_the_main_demos_students_and_bad_sizes(tmp_path):
    with pytest.raises(SystemExit, match="--chat trains"):
        demo_main(["--chat", "--techniques", "alone", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--student-steps must be positive"):
        demo_main(["--chat", "--quick", "--student-steps", "0", "--out", str(tmp_path)])
    assert "--chat" in _parser().format_help()
