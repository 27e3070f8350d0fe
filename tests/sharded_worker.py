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

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ddp_worker import Rows
from test_modules import make_batch, make_module

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


class GradientCount(pl.Callback):
    """How many student and teacher parameters have a gradient when the optimizer is about to step, and how
    many optimizer steps this run took."""

    steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps += 1
        self.counts = {
            name: sum(p.grad is not None for p in getattr(pl_module, name).parameters())
            for name in ("student", "teacher")
        }


def make_strategy(kind: str):
    full = kind.endswith("-full")
    if kind.startswith("fsdp2"):
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=not full)
    if kind.startswith("fsdp"):
        return CPUFSDPStrategy(
            auto_wrap_policy={LlamaDecoderLayer}, use_orig_params=True, state_dict_type="full" if full else "sharded"
        )
    return "auto"


def build(technique: str, dtype: str = ""):
    pl.seed_everything(0)
    module = make_module(technique)
    if dtype == "bf16":
        module.teacher.to(torch.bfloat16)
    # Momentum's first step equals plain SGD's, and it leaves a state entry for every parameter it steps.
    module.optimizer = lambda params: torch.optim.SGD(params, lr=1.0, momentum=0.9)
    return module


def fit(module, kind: str, steps: int, ckpt_path=None, callbacks=(), strategy=None, batch=None, **kwargs):
    """Train ``steps`` optimizer steps on ``batch`` (default: 4 unevenly padded rows), 4 rows a micro-batch."""
    devices = 1 if kind == "single" else 2
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy or make_strategy(kind),
        max_steps=steps,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        callbacks=list(callbacks),
        **kwargs,
    )
    if batch is None:  # rows 0 and 2 (rank 0) are heavily padded, rows 1 and 3 (rank 1) not at all
        batch = make_batch(rows=4, length=12, seed=5, padding=[(0, 8), (2, 6)])
    rows = DataLoader(Rows(batch, devices), batch_size=4 // devices, shuffle=False)
    trainer.fit(module, rows, rows if kwargs.get("limit_val_batches") else None, ckpt_path=ckpt_path)
    return trainer


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
    trainer = fit(module, kind, 1, callbacks=[gradients := GradientCount(), export], limit_val_batches=1)
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


def export_diff(exported: dict[str, str], full: dict[str, dict]) -> float:
    """The largest difference between the weights reloaded from the exported directories and ``full``."""
    diff = 0.0
    for name, directory in exported.items():
        state = AutoModelForCausalLM.from_pretrained(directory).state_dict()
        assert state.keys() == full[name].keys(), (name, state.keys() ^ full[name].keys())
        diff = max(diff, *(float((v - full[name][k].to(v.dtype)).abs().max()) for k, v in state.items()))
    return diff


def resume(technique: str, kind: str, out: str, strategy=make_strategy) -> None:
    """2 steps in one run, and 1 step + checkpoint + 1 resumed step, in one process group."""
    module = build(technique)
    fit(module, kind, 2, strategy=strategy(kind))
    uninterrupted = {name: full_state_dict(module, name) for name in ("student", "teacher")}
    directory = f"{out}.checkpoints"
    checkpoint = ModelCheckpoint(dirpath=directory, filename="mid")
    fit(build(technique), kind, 1, callbacks=[checkpoint], strategy=strategy(kind))
    module = build(technique)
    trainer = fit(
        module,
        kind,
        2,
        ckpt_path=f"{directory}/mid.ckpt",
        callbacks=[gradients := GradientCount()],
        strategy=strategy(kind),
    )
    resumed = {name: full_state_dict(module, name) for name in ("student", "teacher")}
    if trainer.global_rank == 0:
        result = {"uninterrupted": uninterrupted, "resumed": resumed, "steps_run": gradients.steps}
        torch.save(result, out)


if __name__ == "__main__":
    technique, kind, out, *options = sys.argv[1:]
    if options == ["resume"]:
        resume(technique, kind, out)
    else:
        step(technique, kind, out, *options)
