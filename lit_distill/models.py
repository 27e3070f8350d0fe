"""Hugging Face causal language models from a name, a local path or a config dict.

``CausalLM`` is a plain, YAML-friendly description of a model that the Lightning modules build when they
are constructed, so that LightningCLI can take a model straight from a config file::

    student:
      class_path: lit_distill.models.CausalLM
      init_args:
        config: {model_type: llama, vocab_size: 8192, hidden_size: 128, num_hidden_layers: 2, ...}
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CausalLM:
    """How to build a causal LM: exactly one of ``name_or_path`` (pretrained weights) or ``config``.

    Args:
        name_or_path: a Hugging Face Hub name or a local directory with ``config.json`` and weights.
            With ``HF_HUB_OFFLINE=1`` only local directories and the local cache are used.
        config: a config dict with ``model_type`` (e.g. ``{"model_type": "llama", "vocab_size": 8192, ...}``);
            the model is randomly initialized (seed it with ``seed_everything``).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; None keeps the checkpoint's (or fp32).
        gradient_checkpointing: recompute activations in the backward to save memory.
        trust_remote_code: allow model code from the checkpoint (Hub models with custom architectures).

    Raises:
        ValueError: if neither or both of ``name_or_path`` and ``config`` are given, or the dtype is unknown.

    Example:
        >>> spec = CausalLM(config={"model_type": "llama", "vocab_size": 256, "hidden_size": 32,
        ...                         "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4})
        >>> model = spec.build()
    """

    def __init__(
        self,
        name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        dtype: str | None = None,
        gradient_checkpointing: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        if (name_or_path is None) == (config is None):
            raise ValueError("give exactly one of name_or_path (pretrained weights) or config (random init)")
        if config is not None and "model_type" not in config:
            raise ValueError(f"config needs a model_type (e.g. 'llama' or 'gpt2'); got keys {sorted(config)}")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.name_or_path = name_or_path
        self.config = config
        self.dtype = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.trust_remote_code = trust_remote_code

    def build(self) -> nn.Module:
        """Instantiate the model (downloads nothing when offline; raises ``OSError`` naming what was missing)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        dtype = DTYPES.get(self.dtype) if self.dtype else None
        if self.config is not None:
            config = dict(self.config)
            hf_config = AutoConfig.for_model(config.pop("model_type"), **config)
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=self.trust_remote_code)
            if dtype is not None:
                model = model.to(dtype)
        else:
            model = _from_pretrained(self.name_or_path, dtype, self.trust_remote_code)
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model

    def __repr__(self) -> str:
        source = f"name_or_path={self.name_or_path!r}" if self.name_or_path else f"config={self.config!r}"
        return f"CausalLM({source}, dtype={self.dtype!r})"


# Directories the shipped configs write, and the config that writes each.
WRITTEN_BY = {("artifacts", "teacher"): "configs/teacher.yaml"}


def missing_local_path(name_or_path: str | os.PathLike) -> str | None:
    """Why a model or tokenizer name that means a local path cannot be used, or None.

    A name means a local path when it is absolute or starts with ``.`` or ``~``, has more than two parts, its
    first part is an existing directory, or it is a directory the shipped configs write (``artifacts/teacher``);
    otherwise it may be a Hub name (``org/name``) and None is returned, as it is for an existing directory.
    Such a missing path is not looked up on the Hub: saying that the Hub could not be reached would mislead.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return None
    parts = Path(text).parts
    written_by = next((config for tail, config in WRITTEN_BY.items() if parts[-len(tail) :] == tail), None)
    local = (
        text.startswith((".", "~", "/", "\\"))
        or Path(text).is_absolute()
        or len(parts) > 2
        or (len(parts) == 2 and Path(parts[0]).is_dir())
        or written_by is not None
    )
    if not local:
        return None
    message = f"there is no directory {path.resolve()} (a local path, so the Hugging Face Hub was not asked)"
    if written_by is not None:
        message += f"; `lit-distill fit --config {written_by}` writes it: run that first"
    return message


def _from_pretrained(name_or_path: str, dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    missing = missing_local_path(name_or_path)
    if missing is not None:
        raise FileNotFoundError(
            f"could not load a causal LM from {name_or_path!r}: {missing}. Point name_or_path at a directory"
            " holding config.json and the weights (save_pretrained writes one), or at a Hugging Face Hub name"
        )
    kwargs = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        where = "a local directory" if Path(name_or_path).exists() else "the Hugging Face Hub or its local cache"
        raise OSError(
            f"could not load a causal LM from {name_or_path!r} ({where}"
            f"{', HF_HUB_OFFLINE is set' if offline else ''}): {err}. Point name_or_path at a local directory"
            " holding config.json and the weights (save_pretrained writes one)."
        ) from err


def build(
    model: nn.Module | CausalLM | None, vocab_size: int | None = None, special_tokens: dict[str, int] | None = None
) -> nn.Module | None:
    """A module as it is, or the model a :class:`CausalLM` describes; a config-described model takes the
    tokenizer's ``vocab_size`` and special-token ids (``bos_token_id``, ``eos_token_id``, ``pad_token_id``)."""
    if not isinstance(model, CausalLM):
        return model
    if model.config is not None and (vocab_size is not None or special_tokens):
        # A copy for the tokenizer: the caller's spec stays as it was given.
        model = copy.copy(model)
        model.config = {**model.config, **(special_tokens or {})}
        if vocab_size is not None:
            model.config["vocab_size"] = vocab_size
    return model.build()


# Config attributes of heads that transform the logits after the lm_head matmul; the fused-linear path
# would skip the transform, so such models use the logits path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def fusable_head(model: nn.Module) -> nn.Linear | None:
    """The model's lm_head when the loss may read its weight directly instead of calling the model on it.

    That holds for a plain ``nn.Linear`` head over a base model (``model.base_model``) whose config applies
    no transform to the logits after the matmul (soft-capping, logit scaling); otherwise None.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if not isinstance(head, nn.Linear) or getattr(model, "base_model", model) is model:
        return None
    if any(getattr(config, name, None) for name in LOGIT_TRANSFORMS):
        return None
    return head


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's output layer (the padded vocabulary), or ``config.vocab_size``."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if isinstance(head, nn.Linear):
        return head.out_features
    return getattr(getattr(model, "config", None), "vocab_size", None)
