"""On-policy distillation: the student's continuations, the λ draws, both estimators against independent
references, resuming, the validation metrics of the student's samples, and the bad inputs."""

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import VOCAB, InterruptAt, greedy_by_hand, loader, make_batch, make_module, tiny, trainer
from oracle import divergence, oracle

from lit_distill.callbacks import CheckpointOnInterrupt, LmbdaScheduler, OnPolicyEvaluation
from lit_distill.callbacks.sample_quality import score_samples
from lit_distill.losses import DistillationLoss
from lit_distill.modules.generation import continue_prompts, derived_seed
from lit_distill.modules.sampled_token import sampled_token_reverse_kl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
EOS = 2  # helpers.TINY's end-of-sequence token


# --------------------------------------------------------------------------------------- continuations
def test_greedy_continuations_of_prompts_of_different_lengths_are_each_prompts_own():
    model = tiny(seed=3).eval()
    model.generation_config.eos_token_id = None  # no early stop: every row gets all its tokens
    ids = make_batch(rows=3, length=10, seed=1)["input_ids"]
    lengths = torch.tensor([4, 7, 2])
    out = continue_prompts(model, ids, lengths, max_new_tokens=5, do_sample=False)
    assert out.input_ids.shape == (3, 7 + 5)
    for row, length in enumerate(lengths.tolist()):
        expected = greedy_by_hand(model, ids[row, :length], 5)
        assert torch.equal(out.input_ids[row, :length], ids[row, :length])  # the prompt, packed to the left
        assert torch.equal(out.input_ids[row, length : length + 5], expected)
        assert out.attention_mask[row].tolist() == [1] * (length + 5) + [0] * (7 - length)
        labels = out.labels[row].tolist()
        assert labels == [-100] * length + expected.tolist() + [-100] * (7 - length)
    assert out.generated_tokens.tolist() == [5, 5, 5]


def test_tokens_after_the_end_of_sequence_count_for_nothing():
    model = tiny(seed=3).eval()
    ids = make_batch(rows=2, length=8, seed=2)["input_ids"]
    model.generation_config.eos_token_id = None
    free = continue_prompts(model, ids, torch.tensor([4, 4]), max_new_tokens=5, do_sample=False)
    eos = int(free.input_ids[0, 4 + 2])  # row 0's third generated token becomes the end-of-sequence token
    model.generation_config.eos_token_id = eos
    out = continue_prompts(model, ids, torch.tensor([4, 4]), max_new_tokens=5, do_sample=False)
    generated = free.input_ids[0, 4:].tolist()
    first = generated.index(eos)
    assert out.labels[0, 4 : 4 + first + 1].tolist() == generated[: first + 1]  # the eos itself is kept
    assert (out.labels[0, 4 + first + 1 :] == -100).all() and (out.attention_mask[0, 4 + first + 1 :] == 0).all()
    assert int(out.generated_tokens[0]) == first + 1


def test_sampling_is_seeded_leaves_the_global_rng_and_the_training_mode_alone():
    model = tiny(seed=3).train()
    ids = make_batch(rows=4, length=8, seed=2)["input_ids"]
    modes = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    lengths = torch.full((4,), 3)
    torch.manual_seed(123)
    a = continue_prompts(model, ids, lengths, max_new_tokens=8, seed=7)
    after = torch.rand(3)
    torch.manual_seed(123)
    expected_after = torch.rand(3)
    b = continue_prompts(model, ids, lengths, max_new_tokens=8, seed=7)
    c = continue_prompts(model, ids, lengths, max_new_tokens=8, seed=8)
    assert torch.equal(after, expected_after)  # the global RNG is where it was
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert modes and not any(modes) and model.training  # generated in eval mode, back in train mode


def test_derived_seeds_differ_by_each_part():
    seeds = {derived_seed(0, step, micro, rank) for step in range(20) for micro in range(3) for rank in range(2)}
    assert len(seeds) == 120 and derived_seed(1, 2, 3) == derived_seed(1, 2, 3)


# -------------------------------------------------------------------------------------------- the λ draw
class Draws(pl.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(pl_module.is_on_policy())


def test_lmbda_draws_are_seeded_and_near_lmbda():
    def draws(seed):
        module = make_module("on-policy", lmbda=0.3, seed=seed)
        out = []
        for step in range(300):
            module._draw = derived_seed(module.seed, step, 0)
            out.append(module.is_on_policy())
        return out

    first, again, other = draws(0), draws(0), draws(1)
    assert first == again and first != other
    fraction = sum(first) / len(first)
    assert abs(fraction - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 300), fraction


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_lmbda_zero_never_generates_and_one_always_does(lmbda, monkeypatch):
    module = make_module("on-policy", lmbda=lmbda)
    calls = []
    original = module.generate
    monkeypatch.setattr(module, "generate", lambda batch: calls.append(1) or original(batch))
    t = trainer(max_steps=3, log_every_n_steps=1)
    t.fit(module, loader(make_batch()))
    assert len(calls) == 3 * lmbda
    assert float(t.callback_metrics["train/on_policy_fraction"]) == lmbda
    if lmbda:
        assert float(t.callback_metrics["train/mean_generated_length"]) == 6.0  # greedy, no eos reached
        assert float(t.callback_metrics["train/generated_tokens_per_sec"]) > 0
        assert 0 < float(t.callback_metrics["train/generation_time_fraction"]) < 1


class LmbdaSeen(pl.Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.values.append(pl_module.lmbda)  # after the scheduler's hook (callbacks run in order)


def test_lmbda_scheduler_ramps_lmbda_and_the_draws_follow():
    module, seen = make_module("on-policy", lmbda=0.0), LmbdaSeen()
    schedule = LmbdaScheduler(start=0.0, end=1.0, strategy="linear", total_steps=4)
    calls = []
    original = module.generate
    module.generate = lambda batch: calls.append(1) or original(batch)
    trainer(max_steps=5, callbacks=[schedule, seen]).fit(module, loader(make_batch()))
    assert seen.values == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert 1 <= len(calls) <= 4 and module.counts["on_policy"] == len(calls)  # step 0 never, step 4 always


def test_lmbda_scheduler_needs_an_on_policy_module_and_a_probability():
    with pytest.raises(ValueError, match=r"lmbda end must lie in \[0, 1\], got 2.0"):
        LmbdaScheduler(start=0.0, end=2.0)
    with pytest.raises(ValueError, match="LmbdaScheduler sets the lmbda of an OnPolicyDistillation, not of Soft"):
        trainer(max_steps=1, callbacks=[LmbdaScheduler(0.0, 1.0)]).fit(make_module("soft"), loader(make_batch()))


# ----------------------------------------------------------------------------------------- the estimators
@pytest.mark.parametrize("fused_linear", [True, False])
def test_full_estimator_is_the_divergence_at_the_generated_positions(fused_linear):
    loss = DistillationLoss(divergence="jsd", beta=0.3, temperature=1.5, alpha=0.4)
    module = make_module("on-policy", loss=loss, fused_linear=fused_linear, prompt_length=5, max_new_tokens=4)
    batch = make_batch(rows=3, length=9, seed=4)
    module.student.generation_config.eos_token_id = None
    out = module.compute_loss(batch)
    # Reference: hand-made greedy continuations, scored in float64 by the oracle, alpha = 1 (no labels term).
    rows = []
    for row in batch["input_ids"]:
        rows.append(torch.cat([row[:5], greedy_by_hand(module.student, row[:5], 4)]))
    ids = torch.stack(rows)
    with torch.no_grad():
        s = module.student(input_ids=ids).logits[:, 4:-1].double()
        t = module.teacher(input_ids=ids).logits[:, 4:-1].double()
    expected, stats = oracle(
        s, t, ids[:, 5:], divergence_name="jsd", beta=0.3, temperature=1.5, alpha=1.0, reduction="sum"
    )
    assert int(out.num_tokens) == 3 * 4
    assert float(out.loss) == pytest.approx(float(expected), rel=1e-3)  # a small JSD: fp32 logits round it
    assert float(out.teacher_ce) == pytest.approx(float(stats["teacher_ce"]), rel=1e-4)


def test_the_loss_skips_the_positions_no_row_counts_and_keeps_its_value_and_gradients():
    from lit_distill.modules.distillation import ForwardPasses

    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 9, 40, generator=g, requires_grad=True), torch.randn(3, 9, 40, generator=g)
    labels = torch.randint(0, 40, (3, 9), generator=g)
    labels[:, :4] = -100  # a prompt in every row
    labels[0, 4], labels[2, 7] = -100, -100  # and positions single rows skip
    loss = DistillationLoss(divergence="jsd", temperature=2.0, alpha=0.5)
    full = ForwardPasses(student, teacher, labels)
    trimmed = full.from_first_counted(-100)
    assert trimmed.labels.shape == (3, 5) and torch.equal(trimmed.student, student[:, 4:])
    values = []
    for passes in (full, trimmed):
        out = loss(passes.student, passes.teacher, passes.labels, reduction="sum")
        values.append((out.loss.detach(), out.num_tokens, *torch.autograd.grad(out.loss, student)))
    torch.testing.assert_close(values[1], values[0], rtol=1e-6, atol=1e-7)
    nothing = ForwardPasses(student, teacher, torch.full_like(labels, -100))
    assert nothing.from_first_counted(-100).labels.shape == (3, 9)  # nothing counted: nothing to trim


def test_on_policy_loss_scores_the_samples_and_loss_the_data():
    off = DistillationLoss(temperature=2.0, alpha=0.5)
    on = DistillationLoss(divergence="reverse_kl", temperature=1.0)
    batch = make_batch(rows=3, length=9, seed=4)
    module = make_module("on-policy", loss=off, on_policy_loss=on, prompt_length=5, max_new_tokens=4)
    reference = make_module("on-policy", loss=on, prompt_length=5, max_new_tokens=4)
    assert float(module.compute_loss(batch).loss) == pytest.approx(float(reference.compute_loss(batch).loss), rel=1e-6)
    module.lmbda = reference.lmbda = 0.0
    soft = make_module("soft", loss=off)
    assert float(module.compute_loss(batch).loss) == pytest.approx(float(soft.compute_loss(batch).loss), rel=1e-6)
    with pytest.raises(ValueError, match="cannot estimate divergence='forward_kl'"):
        make_module(
            "on-policy", loss=DistillationLoss(divergence="reverse_kl"), on_policy_loss=off, estimator="sampled_token"
        )


def test_mix_both_adds_the_on_policy_mean_to_the_off_policy_loss():
    batch = make_batch(rows=3, length=9, seed=4, padding=[(0, 2)])
    options = {"prompt_length": 5, "max_new_tokens": 4}
    both = make_module("on-policy", mix="both", **options).compute_loss(batch)
    on = make_module("on-policy", **options).compute_loss(batch)
    off = make_module("on-policy", lmbda=0.0, **options).compute_loss(batch)
    assert int(both.num_tokens) == int(off.num_tokens) == 3 * 8 - 2
    expected = float(off.loss) + float(on.loss) / int(on.num_tokens) * int(off.num_tokens)
    assert float(both.loss) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="unknown mix 'sum'; choose 'either' \\(GKD\\) or 'both'"):
        make_module("on-policy", mix="sum")


def test_off_policy_batches_are_soft_label_distillation():
    loss = DistillationLoss(temperature=2.0, alpha=0.7)
    module = make_module("on-policy", loss=loss, lmbda=0.0)
    soft = make_module("soft", loss=loss)
    batch = make_batch(padding=[(1, 3)])
    assert float(module.compute_loss(batch).loss) == pytest.approx(float(soft.compute_loss(batch).loss), rel=1e-6)


def test_sampled_token_value_is_the_reverse_kl_estimate():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 11, generator=gen), torch.randn(6, 11, generator=gen)
    tokens = torch.randint(11, (6,), generator=gen)
    out = sampled_token_reverse_kl(s, t, tokens, DistillationLoss(divergence="reverse_kl", temperature=2.0))
    log_q, log_p = F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1)
    estimate = (log_q - log_p).gather(1, tokens[:, None]).squeeze(1)
    assert float(out.loss) == pytest.approx(4 * float(estimate.sum()), rel=1e-5)  # T² = 4
    assert float(out.soft) == pytest.approx(4 * float(estimate.mean()), rel=1e-5)
    assert float(out.hard) == pytest.approx(float(F.cross_entropy(s, tokens)), rel=1e-5)
    assert int(out.num_tokens) == 6


def test_sampled_token_gradient_is_unbiased_for_the_reverse_kl():
    """Averaged over many draws from the student, the gradient equals the reverse KL's, within the error the
    draws' variance allows (4 standard errors per entry)."""
    gen = torch.Generator().manual_seed(1)
    rows, vocab, draws = 3, 7, 40_000
    s = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    t = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    q = F.softmax(s, -1)
    tokens = torch.multinomial(q, draws, replacement=True, generator=gen).T.reshape(-1)  # (draws * rows,)
    student = s.clone().requires_grad_(True)
    out = sampled_token_reverse_kl(
        student.repeat(draws, 1), t.repeat(draws, 1), tokens, DistillationLoss(divergence="reverse_kl")
    )
    (out.loss / draws).backward()
    exact = s.clone().requires_grad_(True)
    divergence("reverse_kl", exact, t).sum().backward()
    # Each draw's gradient is r(y) (onehot(y) - q): its spread gives the tolerance.
    r = (F.log_softmax(s, -1) - F.log_softmax(t, -1)).gather(1, tokens.view(draws, rows).T).T  # (draws, rows)
    per_draw = r[..., None] * (F.one_hot(tokens.view(draws, rows), vocab) - q)
    stderr = per_draw.std(0) / math.sqrt(draws)
    assert bool(((student.grad - exact.grad).abs() <= 4 * stderr + 1e-9).all())
    assert not torch.allclose(student.grad, torch.zeros_like(student.grad))


def test_sampled_token_module_reads_the_sampled_tokens_only():
    loss = DistillationLoss(divergence="reverse_kl")
    module = make_module("on-policy", loss=loss, estimator="sampled_token", do_sample=True)
    batch = make_batch(rows=2, length=8)
    module._draw = 5
    out = module.compute_loss(batch)
    generated = module.generate(batch)  # the same draw: the same continuations
    ids, labels = generated["input_ids"], generated["labels"][:, 1:]
    with torch.no_grad():
        log_q = F.log_softmax(module.student(input_ids=ids).logits[:, :-1], -1)
        log_p = F.log_softmax(module.teacher(input_ids=ids).logits[:, :-1], -1)
    counted = labels != -100
    picked = labels[counted][:, None]
    estimate = log_q[counted].gather(1, picked) - log_p[counted].gather(1, picked)
    assert int(out.num_tokens) == int(counted.sum()) > 0
    assert float(out.loss) == pytest.approx(float(estimate.sum()), rel=1e-4)


# -------------------------------------------------------------------------------------------- resuming
@pytest.mark.slow
def test_ctrl_c_and_resume_draw_and_sample_what_the_uninterrupted_run_did(tmp_path):
    """lmbda=0.5 with sampling and accumulate=2 over 4 micro-batches: Ctrl-C during step 1 saves after it; the
    resumed run makes the uninterrupted run's λ draws and samples, and ends with its weights."""
    data = [make_batch(seed=i, padding=[(i % 4, i % 3)]) for i in range(4)]

    def build():
        return make_module("on-policy", lmbda=0.5, do_sample=True, seed=3)

    pl.seed_everything(0)
    uninterrupted, seen = build(), Draws()
    trainer(max_steps=6, accumulate_grad_batches=2, callbacks=[seen]).fit(uninterrupted, loader(*data))
    assert 0 < sum(seen.seen) < len(seen.seen)  # both kinds of batches happened

    pl.seed_everything(0)
    saver = CheckpointOnInterrupt(dirpath=str(tmp_path))
    with pytest.raises(SystemExit):
        trainer(max_steps=6, accumulate_grad_batches=2, callbacks=[saver, InterruptAt(1, 2)]).fit(
            build(), loader(*data)
        )
    resumed, later = build(), Draws()
    trainer(max_steps=6, accumulate_grad_batches=2, callbacks=[later]).fit(
        resumed, loader(*data), ckpt_path=saver.saved_path
    )
    assert later.seen == seen.seen[4:]
    assert resumed.counts["on_policy"] == uninterrupted.counts["on_policy"]
    for key, value in uninterrupted.student.state_dict().items():
        torch.testing.assert_close(resumed.student.state_dict()[key], value, msg=key)


# --------------------------------------------------------------------------- the samples' validation metrics
def test_sample_scores_match_an_independent_computation():
    student, teacher = tiny(seed=0).eval(), tiny(hidden=48, seed=1).eval()
    ids = make_batch(rows=3, length=10, seed=6)["input_ids"]
    lengths = torch.tensor([4, 4, 4])
    scores = score_samples(student, teacher, ids, lengths, max_new_tokens=5, seed=11)
    sampled = continue_prompts(student, ids, lengths, max_new_tokens=5, seed=11)
    seq, labels = sampled.input_ids, sampled.labels[:, 1:]
    with torch.no_grad():
        log_q = F.log_softmax(student(input_ids=seq).logits[:, :-1].double(), -1)
        log_p = F.log_softmax(teacher(input_ids=seq).logits[:, :-1].double(), -1)
    counted = labels != -100
    nll = -log_p[counted].gather(1, labels[counted][:, None]).sum()
    reverse_kl = (log_q.exp() * (log_q - log_p)).sum(-1)[counted].sum()
    assert int(scores.tokens) == int(counted.sum())
    assert float(scores.teacher_nll) == pytest.approx(float(nll), rel=1e-5)
    assert float(scores.reverse_kl) == pytest.approx(float(reverse_kl), rel=1e-4)


@pytest.mark.parametrize("kind", ["soft", "offline"])
def test_validation_logs_the_teacher_nll_and_reverse_kl_of_the_students_samples(kind):
    from helpers import with_teacher_signal

    batch = make_batch(rows=2, length=12, seed=3)
    teacher = tiny(hidden=48, seed=1).eval()
    module = make_module(kind)
    callback = OnPolicyEvaluation(
        prompt_length=4, max_new_tokens=6, seed=5, teacher=teacher if kind == "offline" else None
    )
    data = with_teacher_signal(batch) if kind == "offline" else batch
    t = trainer(callbacks=[callback])
    t.validate(module, loader(data), verbose=False)
    lengths = torch.full((2,), 4)
    expected = score_samples(
        module.student, teacher, batch["input_ids"], lengths, max_new_tokens=6, seed=derived_seed(5, 0, 0)
    )
    metrics = t.callback_metrics
    assert float(metrics["val/teacher_nll_of_student"]) == pytest.approx(
        float(expected.teacher_nll / expected.tokens), rel=1e-5
    )
    assert float(metrics["val/student_reverse_kl"]) == pytest.approx(
        float(expected.reverse_kl / expected.tokens), rel=1e-5
    )


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"lmbda": 1.5}, r"lmbda is the probability that a batch is on-policy; it must lie in \[0, 1\], got 1.5"),
        ({"lmbda": -0.1}, r"it must lie in \[0, 1\], got -0.1"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1, got 0"),
        ({"prompt_length": 0}, "prompt_length must be >= 1, got 0"),
        ({"top_p": 0.0}, r"top_p must lie in \(0, 1\], got 0.0"),
        ({"sampling_temperature": 0.0}, "sampling_temperature must be > 0, got 0.0"),
        ({"estimator": "mc"}, "unknown estimator 'mc'; choose 'full' or 'sampled_token'"),
        (
            {"estimator": "sampled_token"},
            "estimator='sampled_token' estimates the reverse KL from the sampled tokens alone; it cannot estimate"
            " divergence='forward_kl'",
        ),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        make_module("on-policy", **options)


def test_a_student_that_cannot_generate_is_refused():
    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, VOCAB)

        def forward(self, input_ids, attention_mask=None):
            return self.embed(input_ids)

    from lit_distill.modules import OnPolicyDistillation

    with pytest.raises(ValueError, match="on-policy distillation needs a student that can generate text"):
        OnPolicyDistillation(Logits(), tiny(hidden=48, seed=1))


def test_prompts_as_long_as_the_sequences_are_refused():
    module = make_module("on-policy", prompt_length=12)
    with pytest.raises(ValueError, match=r"prompt_length=12 is not shorter than the sequences \(12 tokens\)"):
        module.compute_loss(make_batch(length=12))
    with pytest.raises(ValueError, match="every row's prompt_mask must mark between 1 and 11 tokens"):
        module.compute_loss({**make_batch(length=12), "prompt_mask": torch.zeros(4, 12, dtype=torch.long)})


def test_evaluation_without_a_teacher_is_refused():
    with pytest.raises(ValueError, match="OnPolicyEvaluation scores the student's samples with a teacher"):
        trainer(callbacks=[OnPolicyEvaluation()]).validate(make_module("offline"), loader(make_batch()), verbose=False)


def test_prompt_mask_sets_each_rows_prompt():
    module = make_module("on-policy", max_new_tokens=3)
    batch = make_batch(rows=2, length=10, seed=8)
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0, :3], mask[1, :6] = 1, 1
    assert module.prompt_lengths({**batch, "prompt_mask": mask}).tolist() == [3, 6]
    generated = module.generate({**batch, "prompt_mask": mask})
    assert torch.equal(generated["input_ids"][1, :6], batch["input_ids"][1, :6])
    assert (generated["labels"][0, :3] == -100).all() and (generated["labels"][0, 3:6] != -100).all()


def test_padded_rows_continue_their_real_tokens_and_all_padding_rows_count_nothing():
    module = make_module("on-policy", prompt_length=6, max_new_tokens=3)
    batch = make_batch(rows=3, length=10, seed=9, padding=[(1, 7), (2, 10)])  # row 1: 3 real tokens, row 2: none
    assert module.prompt_lengths(batch).tolist() == [6, 3, 1]
    generated = module.generate(batch)
    assert torch.equal(generated["input_ids"][1, :3], batch["input_ids"][1, :3])
    assert (generated["labels"][1, 3:6] != -100).all()
    assert (generated["labels"][2] == -100).all()
