"""One epoch of ChatDataModule batches on two DDP processes (gloo, CPU); saves what each process saw.

Run by ``test_chat_data.py`` as ``python tests/chat_ddp_worker.py <train.jsonl> <tokenizer> <cache> <out.pt>``;
Lightning's DDP launcher starts the second process by running this script again. Process 0 saves every batch
each process trained on (rows without their padding), the training rows, the student's weights before and after
the first step, and the first step's weights computed by hand in one process from both processes' first batches
(the loss summed over the learned tokens of both, divided by their count).
"""

import sys
import warnings

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from helpers import ddp_trainer, finish_worker, tiny

from lit_distill.data import ChatDataModule
from lit_distill.modules import LanguageModelTraining

warnings.filterwarnings("ignore")


def unpadded(batch: dict) -> list[dict]:
    """The rows of a chat batch without their padding, as lists."""
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        n = int(mask.sum())
        rows.append({"input_ids": ids[:n].tolist(), "labels": labels[:n].tolist()})
    return rows


class Record(Callback):
    """Every training batch's rows, and the student's weights after the first step."""

    def __init__(self) -> None:
        self.batches, self.after_first = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(unpadded(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.after_first is None:
            self.after_first = {k: v.clone() for k, v in pl_module.student.state_dict().items()}


def main(train: str, tokenizer: str, cache: str, out: str) -> None:
    data = ChatDataModule(train, tokenizer=tokenizer, batch_size=2, val_fraction=0.0, cache_dir=cache)
    student = tiny(hidden=32, seed=4, vocab_size=data.vocab_size)
    module = LanguageModelTraining(student, vocab_size=data.vocab_size, optimizer=lambda p: torch.optim.SGD(p, lr=1.0))
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    record = Record()
    trainer = ddp_trainer([record])
    trainer.fit(module, datamodule=data)
    seen = [None, None]
    torch.distributed.all_gather_object(seen, record.batches)
    if trainer.global_rank != 0:
        return
    # The first step by hand: both processes' first batches as one, the summed loss over their learned tokens.
    reference = LanguageModelTraining(tiny(hidden=32, seed=4, vocab_size=data.vocab_size), vocab_size=data.vocab_size)
    reference.student.load_state_dict(before)
    combined = data.collate(seen[0][0] + seen[1][0])
    out_loss = reference.compute_loss(combined)
    (out_loss.loss / out_loss.num_tokens).backward()
    expected = {name: p.detach() - p.grad for name, p in reference.student.named_parameters()}
    rows = [{"input_ids": r["input_ids"].tolist(), "labels": r["labels"].tolist()} for r in data.train_rows]
    torch.save(
        {
            "seen": seen,
            "train_rows": rows,
            "before": before,
            "after_first": record.after_first,
            "expected": expected,
            "counted": int(out_loss.num_tokens),
        },
        out,
    )


if __name__ == "__main__":
    main(*sys.argv[1:5])
    finish_worker()
