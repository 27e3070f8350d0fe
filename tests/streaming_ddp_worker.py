"""One epoch of StreamingTextDataModule batches on two DDP processes (gloo, CPU); saves what each process saw.

Run by ``test_streaming.py`` as ``python tests/streaming_ddp_worker.py <corpus.jsonl> <tokenizer> <out.pt>``;
Lightning's DDP launcher starts the second process by running this script again. The corpus gives the two
processes different numbers of rows; process 0 saves every batch each process trained on and the steps each ran.
"""

import sys
import warnings

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from helpers import RecordInputIds, adam, ddp_trainer, finish_worker, tiny

from lit_distill.data.streaming import StreamingTextDataModule
from lit_distill.modules import LanguageModelTraining

warnings.filterwarnings("ignore")


def main(corpus: str, tokenizer: str, out: str) -> None:
    data = StreamingTextDataModule([corpus], tokenizer=tokenizer, seq_len=8, batch_size=2, val_fraction=0.2,
                                   shuffle_buffer=4)  # fmt: skip
    module = LanguageModelTraining(student=tiny(vocab_size=data.vocab_size), optimizer=adam)
    record = RecordInputIds()
    trainer = ddp_trainer([record])
    trainer.fit(module, datamodule=data)
    seen, steps = [None, None], [None, None]
    torch.distributed.all_gather_object(seen, record.batches)
    torch.distributed.all_gather_object(steps, trainer.global_step)
    if trainer.global_rank == 0:
        torch.save({"seen": seen, "steps": steps}, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    finish_worker()
