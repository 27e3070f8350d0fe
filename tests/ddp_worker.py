"""One optimizer step of a technique on a fixed global batch, on 1 or 2 CPU processes; saves the result.

Run by ``test_distributed.py`` as ``python tests/ddp_worker.py <technique> <devices> <out.pt>``. With two
devices Lightning's DDP launcher starts the second process by running this script again.
"""

import sys
import warnings

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_modules import make_batch, make_module

warnings.filterwarnings("ignore")


class Rows(Dataset):
    """The global batch row by row; DistributedSampler gives rank r the rows r, r + 2, ..."""

    def __init__(self, batch):
        self.batch = batch

    def __len__(self):
        return self.batch["input_ids"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


def main(technique: str, devices: int, out: str) -> None:
    # Rows 0 and 2 (rank 0 under DDP) are heavily padded, rows 1 and 3 (rank 1) not at all.
    batch = make_batch(rows=4, length=12, seed=5, padding=[(0, 8), (2, 6)])
    pl.seed_everything(0)
    module = make_module(technique)
    module.optimizer = lambda params: torch.optim.SGD(params, lr=1.0)
    before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(Rows(batch), batch_size=4 // devices, shuffle=False))
    if trainer.global_rank == 0:
        delta = {k: before[k] - v for k, v in module.student.state_dict().items()}
        torch.save({"delta": delta, "loss": float(trainer.callback_metrics["train/loss"])}, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
