"""FSDP2 sharding of a distillation module, for Lightning's ``ModelParallelStrategy``, and gathering it back.

A teacher too large for one device is sharded over the data-parallel ranks like the student: every decoder
layer of both models becomes its own ``fully_shard`` unit (gathered only while it runs), and the remaining
parameters (embeddings, final norms, lm_heads) form one root unit over the whole LightningModule. The root
unit is gathered for all of ``training_step`` and ``validation_step`` rather than for one ``forward``: the
fused-linear loss reads ``lm_head.weight`` directly instead of calling the head.

A frozen teacher keeps ``requires_grad=False``: it gets no gradients, no reduce-scatter and, since
``parameter_groups`` leaves it out, no optimizer state; each rank stores only its shard of it.

Saving a model from a sharded module (``save_pretrained``) needs its weights gathered first on every rank:
:func:`full_state_dict` does that for FSDP2, for Lightning's ``FSDPStrategy`` (FSDP1) and for DeepSpeed ZeRO-3.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard, register_fsdp_forward_method

#: LightningModule methods that read the root unit's parameters (the fused-linear path needs lm_head.weight)
FORWARD_METHODS = ("training_step", "validation_step")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model (the classes its ``_no_split_modules`` names), outermost first.

    Models without ``_no_split_modules`` give none; all their parameters then live in the root unit.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(module: nn.Module, mesh: DeviceMesh) -> None:
    """Apply ``fully_shard`` to the student's and teacher's decoder layers, then to ``module`` itself as the root.

    Args:
        module: a :class:`~lit_distill.modules.DistillationModule`; sharded in place (calling twice is a no-op).
        mesh: the data-parallel device mesh (``self.device_mesh["data_parallel"]`` in ``configure_model``).
    """
    if isinstance(module, FSDPModule):
        return
    for model in (module.student, getattr(module, "teacher", None)):
        if model is None:
            continue
        # fully_shard goes bottom-up; reversed pre-order puts any nested block before its parent.
        for layer in reversed(decoder_layers(model)):
            fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(module, name)


def full_state_dict(module: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The unsharded state dict of ``module.<name>`` (``"student"`` or ``"teacher"``), e.g. to export it.

    A collective under FSDP and ZeRO-3: every rank must call it, and only rank 0 is sure to get the tensors
    (on CPU when the parameters live on a GPU). FSDP2 (:func:`shard`) gathers only that model; Lightning's
    FSDPStrategy (FSDP1) gathers the whole module and keeps that model's entries; ZeRO-3 gathers that model's
    parameters on every rank at once; an unsharded module gives its own.
    """
    model = getattr(module, name)
    if isinstance(module, FSDPModule):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if any(hasattr(p, "ds_tensor") for p in model.parameters()):  # partitioned by DeepSpeed ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):  # released again on leaving
            first = torch.distributed.get_rank() == 0  # one copy in host memory, not one per rank
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if first else {}
    wrapper = module.trainer.strategy.model if module._trainer is not None else None
    if not isinstance(wrapper, FullyShardedDataParallel):
        return model.state_dict()
    # FSDP1's offload to CPU crashes when the parameters are already there (CPU runs, as in the tests).
    on_gpu = next(wrapper.parameters()).device.type != "cpu"
    state = get_model_state_dict(wrapper, options=StateDictOptions(full_state_dict=True, cpu_offload=on_gpu))
    prefix = f"{name}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def close_process_group() -> None:
    """Destroy the default process group, if this process has one, at the end of a successful run.

    Lightning leaves it open. A Gloo group left to the interpreter's exit can abort the process (SIGABRT,
    "terminate called without an active exception") after everything else succeeded: its worker threads still
    hold tensors while Python tears down. Only after success: on an error another rank may still be inside a
    collective, and destroying the group would hang instead of exiting.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
