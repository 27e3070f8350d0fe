"""One optimizer step of a technique on a fixed global batch, on 1 or 2 CPU processes; saves the result.

Run by ``test_distributed.py`` as ``python tests/ddp_worker.py <technique> <devices> <out.pt> [fault]``. With
two devices Lightning's DDP launcher starts the second process by running this script again. Faults:

- ``trim``: each process trims its batch's trailing all-padding columns, so the processes see sequences of
  different lengths (as a pad-to-longest collator gives them);
- ``nan-skip`` / ``nan-raise``: the second process's student produces NaN, with ``on_nonfinite`` skip or
  raise. The single-process reference of ``nan-skip`` has that process's rows all padding instead;
- ``interrupt``: Ctrl-C reaches the second process only, during step 0 of 2; both must save after step 0;
- ``sample-eval``: no training; ``OnPolicyEvaluation`` scores each process's samples at one validation. Saves
  the logged metrics and, from process 0, each process's rows scored in one process with that process's seed.
"""

import os
import signal
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from helpers import Rows, finish_worker, make_batch, make_module, with_teacher_signal

from lit_distill.callbacks import CheckpointOnInterrupt, OnPolicyEvaluation
from lit_distill.callbacks.sample_quality import score_samples
from lit_distill.modules.generation import derived_seed, prompt_lengths_of

warnings.filterwarnings("ignore")


def trim(rows):
    """Collate rows and drop the trailing columns that are padding in every row."""
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    length = int(batch["attention_mask"].any(0).nonzero().max()) + 1
    return {k: v[:, :length] for k, v in batch.items()}


def main(technique: str, devices: int, out: str, fault: str = "") -> None:
    # Rows 0 and 2 (process 0 under DDP) are heavily padded, rows 1 and 3 (process 1) not at all.
    batch = make_batch(rows=4, length=12, seed=5, padding=[(0, 8), (2, 6)])
    if technique == "offline":
        batch = with_teacher_signal(batch)
    pl.seed_everything(0)
    if fault == "sample-eval":
        return sample_eval(make_module(technique), batch, devices, out)
    module = make_module(technique, on_nonfinite="skip" if fault == "nan-skip" else "raise")
    module.optimizer = lambda params: torch.optim.SGD(params, lr=1.0)
    if fault == "nan-skip" and devices == 1:
        batch["attention_mask"][1::2] = 0  # what the second process contributes once skipped: nothing
    if fault.startswith("nan") and devices > 1:
        poison_on_rank_1(module)
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    callbacks = []
    if fault == "interrupt":
        callbacks = [CheckpointOnInterrupt(dirpath=str(Path(out).parent)), InterruptOnRank1()]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        use_distributed_sampler=False,
        max_steps=2 if fault == "interrupt" else 1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    collate = trim if fault == "trim" else None
    trainer.fit(module, DataLoader(Rows(batch, devices), batch_size=4 // devices, shuffle=False, collate_fn=collate))
    if trainer.global_rank == 0:
        delta = {k: before[k] - v for k, v in module.student.state_dict().items()}
        torch.save({"delta": delta, "loss": float(trainer.callback_metrics["train/loss"])}, out)


def sample_eval(module, batch, devices: int, out: str) -> None:
    """One validation with ``OnPolicyEvaluation`` on 1 or 2 processes; the reference sums each process's rows."""
    evaluation = OnPolicyEvaluation(prompt_length=4, max_new_tokens=5, max_batches=1, seed=7)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", use_distributed_sampler=False,
        callbacks=[evaluation], logger=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.validate(module, DataLoader(Rows(batch, devices), batch_size=4 // devices, shuffle=False))
    if trainer.global_rank != 0:
        return
    sums = torch.zeros(devices, 3, dtype=torch.float64)
    for rank in range(devices):  # what each process scored: its rows (rank, rank + W, ...) with its seed
        rows = {k: v[rank::devices] for k, v in batch.items()}
        lengths = prompt_lengths_of(rows["input_ids"], 4, rows["attention_mask"])
        seed = derived_seed(7, 0, rank)
        sums[rank] = torch.stack([s.double() for s in score_samples(
            module.student, module.teacher, rows["input_ids"], lengths, max_new_tokens=5, seed=seed
        )])  # fmt: skip
    names = ("val/teacher_nll_of_student", "val/student_reverse_kl")
    metrics = {name: float(trainer.callback_metrics[name]) for name in names}
    total = sums.sum(0)
    reference = {name: float(total[i] / total[2]) for i, name in enumerate(names)}
    torch.save({"metrics": metrics, "reference": reference, "per_process": sums}, out)


class InterruptOnRank1(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == 1 and trainer.global_step == 0:
            os.kill(os.getpid(), signal.SIGINT)


def poison_on_rank_1(module) -> None:
    def hook(embeddings, args, output):
        return output * float("nan") if torch.distributed.get_rank() == 1 else output

    module.student.get_input_embeddings().register_forward_hook(hook)


if __name__ == "__main__":
    main(*sys.argv[1:2], int(sys.argv[2]), *sys.argv[3:])
    finish_worker()
