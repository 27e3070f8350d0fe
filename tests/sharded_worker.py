"""One optimizer step and one validation pass under FSDP on 2 CPU processes (gloo), or unsharded on one.

Run by ``test_sharded.py`` as ``python tests/sharded_worker.py <technique> <kind> <out.pt> [bf16|resume]``:

- kind ``fsdp``: Lightning's ``FSDPStrategy`` (FSDP1), each Llama decoder layer its own unit, ``use_orig_params``;
  ``fsdp2``: Lightning's ``ModelParallelStrategy``, sharded by ``DistillationModule.configure_model``;
  ``single``: one process, unsharded. A ``-full`` suffix saves checkpoints in one file instead of a
  directory of shards (``state_dict_type="full"``, ``save_distributed_checkpoint=False``);
- ``bf16``: the teacher in bfloat16, the student in float32.

Rank 0 saves the training and validation losses, the change of every weight (student and teacher, gathered by
:func:`lit_distill.sharding.full_state_dict`), the largest difference between those weights and the ones that
``ExportModel`` wrote (reloaded with ``from_pretrained``), and, per rank, how many student and teacher
parameters are in the optimizer, have optimizer state and have a gradient, how many teacher elements the rank
stores, and how many FSDP units there are.

``resume`` instead trains 2 steps in one go, then 1 step that saves a checkpoint (``ModelCheckpoint``) and,
from it, a resumed run to step 2; rank 0 saves both runs' final weights.
"""

import sys
import warnings

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from helpers import GradientCount, build, export_diff, finish_worker, fit, resume

from lit_distill.callbacks import ExportModel
from lit_distill.sharding import full_state_dict

warnings.filterwarnings("ignore")
STATS = ("in_optimizer", "with_state", "with_grad")


class CPUFSDPStrategy(FSDPStrategy):
    """``FSDPStrategy`` on CPU, for tests: Lightning refuses ``strategy="fsdp"`` on CPU (a subclass instance
    passes), and FSDP1 needs ``device_id=cpu`` spelled out where Lightning passes the device index (None)."""

    def _setup_model(self, model):
        model = FullyShardedDataParallel(
            model, sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs
        )
        return super()._setup_model(model)  # already wrapped: Lightning's remaining setup only


def make_strategy(kind: str):
    full = kind.endswith("-full")
    if kind.startswith("fsdp2"):
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=not full)
    if kind.startswith("fsdp"):
        return CPUFSDPStrategy(
            auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=True, state_dict_type="full" if full else "sharded"
        )
    return "auto"


def local_numel(p: torch.Tensor) -> int:
    return p.to_local().numel() if hasattr(p, "to_local") else p.numel()


def per_rank(values: list[int], devices: int) -> list[list[int]]:
    """``values`` of every rank (a collective: all ranks call it)."""
    mine = torch.tensor(values)
    if devices == 1:
        return [mine.tolist()]
    gathered = [torch.zeros_like(mine) for _ in range(devices)]
    dist.all_gather(gathered, mine)
    return [t.tolist() for t in gathered]


def step(technique: str, kind: str, out: str, dtype: str = "") -> None:
    module = build(technique, dtype)
    before = {k: v.clone() for k, v in module.state_dict().items() if k.startswith(("student.", "teacher."))}
    teacher_numel = sum(p.numel() for p in module.teacher.parameters())
    exported = {"student": f"{out}.student"} | ({"teacher": f"{out}.teacher"} if technique == "co" else {})
    export = ExportModel(exported["student"], teacher_directory=exported.get("teacher"))
    callbacks = [gradients := GradientCount(), export]
    trainer = fit(module, kind, 1, callbacks=callbacks, strategy=make_strategy(kind), limit_val_batches=1)
    devices = trainer.world_size

    if isinstance(module, FSDPModule):
        module.reshard()  # FSDP2 keeps the root unit gathered after validation; its parameters are then others
    optimizer = trainer.optimizers[0]
    counted = {
        "in_optimizer": [p for group in optimizer.param_groups for p in group["params"]],
        "with_state": [p for p, state in optimizer.state.items() if state],
    }
    stats = []
    for name in ("student", "teacher"):
        ids = {id(p) for p in getattr(module, name).parameters()}
        stats += [*(sum(id(p) in ids for p in counted[stat]) for stat in counted), gradients.counts[name]]
    units = sum(isinstance(m, (FullyShardedDataParallel, FSDPModule)) for m in trainer.strategy.model.modules())
    stored = sum(local_numel(p) for p in module.teacher.parameters())
    ranks = per_rank([*stats, stored, units], devices)
    full = {name: full_state_dict(module, name) for name in ("student", "teacher")}  # all ranks gather
    if trainer.global_rank == 0:
        keys = [f"{name}_{stat}" for name in ("student", "teacher") for stat in STATS]
        result = {
            "loss": float(trainer.callback_metrics["train/loss"]),
            "val_loss": float(trainer.callback_metrics["val/loss"]),
            "delta": {k: v - full[k.split(".")[0]][k.split(".", 1)[1]].to(v.dtype) for k, v in before.items()},
            "export_diff": export_diff(exported, full),
            "ranks": [dict(zip([*keys, "teacher_stored", "units"], r, strict=True)) for r in ranks],
            "parameters": {name: len(list(getattr(module, name).parameters())) for name in ("student", "teacher")},
            "teacher_numel": teacher_numel,
        }
        torch.save(result, out)


if __name__ == "__main__":
    technique, kind, out, *options = sys.argv[1:]
    if options == ["resume"]:
        resume(technique, kind, out, make_strategy)
    else:
        step(technique, kind, out, *options)
    finish_worker()
