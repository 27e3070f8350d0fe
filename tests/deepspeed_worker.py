"""One optimizer step and one validation pass under DeepSpeed ZeRO on 2 CPU processes (gloo), or on one.

Run by ``test_sharded.py`` as ``python tests/deepspeed_worker.py <technique> <single|ds2|ds3> <out.pt> [option]``
(needs ``pip install deepspeed``); ``ds2`` and ``ds3`` are ZeRO stages 2 and 3. Options:

- ``accumulate``: 8 rows, 2 micro-batches of 4 global rows per optimizer step (``accumulate_grad_batches=2``);
- ``resume``: as in ``sharded_worker.py``, with checkpoints that leave the frozen teacher out.

Rank 0 saves what ``sharded_worker.py`` saves for the step tests: the losses, the change of every weight and
how far the weights that ``ExportModel`` wrote are from the gathered ones.
"""

import sys
import warnings

import torch
from helpers import GradientCount, accumulation_batch, build, export_diff, finish_worker, fit, resume
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

from lit_distill.callbacks import ExportModel
from lit_distill.sharding import full_state_dict

warnings.filterwarnings("ignore")


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` on CPU processes, for tests: Lightning allows it on CUDA GPUs only. The checks it
    makes there are skipped; DeepSpeed itself runs on its CPU accelerator with gloo."""

    @property
    def root_device(self):
        return torch.device("cpu", self.local_rank)  # DeepSpeed reads each process's device index from it

    def setup_environment(self):
        DDPStrategy.setup_environment(self)  # without the CUDA check

    def setup_distributed(self):
        reset_seed()  # as DeepSpeedStrategy does, without its check of CUDA device indices
        self.set_world_ranks()
        self._init_deepspeed_distributed()


def make_strategy(kind: str) -> CPUDeepSpeedStrategy:
    zero = {"stage": int(kind[2]), "stage3_param_persistence_threshold": 0}  # ZeRO-3: partition every parameter
    config = {"zero_optimization": zero, "zero_allow_untested_optimizer": True, "train_micro_batch_size_per_gpu": 2}
    # As configs/deepspeed_example.yaml: checkpoints without the frozen teacher.
    return CPUDeepSpeedStrategy(process_group_backend="gloo", config=config, exclude_frozen_parameters=True)


def main(technique: str, kind: str, out: str, option: str = "") -> None:
    module = build(technique)
    accumulate = 2 if option == "accumulate" else 1
    before = {k: v.clone() for k, v in module.state_dict().items() if k.startswith(("student.", "teacher."))}
    exported = {"student": f"{out}.student"} | ({"teacher": f"{out}.teacher"} if technique == "co" else {})
    export = ExportModel(exported["student"], teacher_directory=exported.get("teacher"))
    trainer = fit(
        module,
        kind,
        1,
        callbacks=[GradientCount(), export],
        strategy="auto" if kind == "single" else make_strategy(kind),
        batch=accumulation_batch() if accumulate > 1 else None,
        limit_val_batches=1,
        accumulate_grad_batches=accumulate,
    )
    full = {name: full_state_dict(module, name) for name in ("student", "teacher")}  # all ranks gather
    if trainer.global_rank == 0:
        result = {
            "loss": float(trainer.callback_metrics["train/loss"]),
            "val_loss": float(trainer.callback_metrics["val/loss"]),
            "delta": {k: v - full[k.split(".")[0]][k.split(".", 1)[1]].to(v.dtype) for k, v in before.items()},
            "export_diff": export_diff(exported, full),
        }
        torch.save(result, out)


if __name__ == "__main__":
    if sys.argv[4:] == ["resume"]:
        resume(*sys.argv[1:4], strategy=make_strategy)
    else:
        main(*sys.argv[1:])
    finish_worker()
