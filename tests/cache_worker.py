"""Write a teacher cache on 1 or 2 CPU processes (DDP, gloo).

Run by ``test_teacher_cache.py`` as ``python tests/cache_worker.py <devices> <corpus dir> <cache dir> [shared]``.
With two devices Lightning's DDP launcher starts the second process by running this script again; each process
writes its own shards and process 0 the manifest. ``shared`` also writes a top-k cache to ``<cache dir>-topk``
from the same teacher pass.
"""

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from helpers import finish_worker, small_text_data, tiny

from lit_distill.data.teacher_cache import TeacherSignal, cache_teacher

warnings.filterwarnings("ignore")


def main(devices: int, corpus: str, cache: str, shared: bool = False) -> None:
    data = small_text_data(Path(corpus))
    teacher = tiny(hidden=32, seed=1, vocab_size=data.vocab_size)
    signal = TeacherSignal(teacher, method="sampled", samples=8, seed=5)
    if shared:
        signal, cache = [signal, TeacherSignal(teacher, k=4, temperature=2.0)], [cache, f"{cache}-topk"]
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    cache_teacher(signal, data, cache, shard_sequences=3, batch_size=2, trainer=trainer)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:] == ["shared"])
    finish_worker()
