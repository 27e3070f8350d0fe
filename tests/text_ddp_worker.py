"""One epoch of a prepared TextDataModule on two DDP processes (gloo, CPU); saves the rows each process read.

Run by ``test_prepared.py`` as ``python tests/text_ddp_worker.py <prepared dir> <out.pt>``; Lightning's DDP launcher
starts the second process by running this script again. Process 0 saves every process's batches and the shuffle
seed the processes shared.
"""

import sys
import warnings

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from helpers import RecordInputIds, ddp_trainer, finish_worker, tiny

from lit_distill.data import TextDataModule
from lit_distill.modules import LanguageModelTraining

warnings.filterwarnings("ignore")


def main(prepared: str, out: str) -> None:
    data = TextDataModule(prepared=prepared, seq_len=16, batch_size=2)
    module = LanguageModelTraining(tiny(hidden=32, seed=4, vocab_size=data.vocab_size), vocab_size=data.vocab_size)
    record = RecordInputIds()
    trainer = ddp_trainer([record])
    trainer.fit(module, datamodule=data)
    seen = [None, None]
    torch.distributed.all_gather_object(seen, record.batches)
    if trainer.global_rank == 0:
        torch.save({"seen": seen, "seed": data.sampler.seed}, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
    finish_worker()
