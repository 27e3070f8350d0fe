"""The loss keywords, written once: names, defaults, types and documentation, validated once.

Every entry point (``distillation_loss``, ``fused_linear_distillation_loss``, ``DistillationLoss``) takes the
same keywords. They are the fields of :class:`LossOptions`, and :func:`loss_keywords` turns an entry point's
``**options`` into exactly those fields, as explicit parameters in its signature, type hints and docstring, so
``help()``, ``inspect.signature`` and LightningCLI (jsonargparse) see every keyword while the list lives here
only. A new keyword is one field here (and its use in the backends).

The tables of names live here too. A divergence's position in ``DIVERGENCES`` is its integer code, the
constexpr the Triton kernels are specialized on.
"""

from __future__ import annotations

import functools
import inspect
import math
import textwrap
import typing
from dataclasses import dataclass, field, fields
from typing import Any

import torch

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
#: The code of each divergence in the Triton kernels (its position in ``DIVERGENCES``).
DIVERGENCE_CODES = {name: code for code, name in enumerate(DIVERGENCES)}
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")
HARD_LABEL_SOURCES = ("labels", "teacher_argmax")


def _keyword(default: Any, doc: str) -> Any:
    """A field of :class:`LossOptions`: its default and the line that documents it in every entry point."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class LossOptions:
    """The keywords of the distillation losses, validated when constructed.

    Invalid values raise ``ValueError`` / ``TypeError`` naming the argument and the fix. Numbers are stored
    as floats (a one-element tensor is accepted and read once), ``t2_scaling`` as a bool. The backends read
    :attr:`resolved_divergence` and :attr:`mix` rather than ``divergence``, ``beta`` and ``skew``.
    Each field's documentation is in its ``metadata["doc"]``.
    """

    divergence: str = _keyword(
        "forward_kl",
        "``forward_kl`` KL(p‖q), ``reverse_kl`` KL(q‖p), ``jsd`` (``beta``; 0 is forward KL and 1 reverse KL),"
        " ``skew_forward_kl`` KL(p‖λp+(1-λ)q) and ``skew_reverse_kl`` KL(q‖λq+(1-λ)p) (λ = ``skew``), or"
        " ``tvd`` ½Σ|p-q|.",
    )
    beta: float = _keyword(0.5, "JSD mixing weight in [0, 1].")
    skew: float = _keyword(0.1, "skew λ in [0, 1] of the skew divergences.")
    temperature: float = _keyword(1.0, "softmax temperature T > 0 of the soft term.")
    t2_scaling: bool = _keyword(True, "multiply the soft term by T² (Hinton) so its gradient does not shrink with T.")
    alpha: float = _keyword(1.0, "weight in [0, 1] of the soft term; the hard term gets ``1 - alpha``.")
    hard_labels: str = _keyword(
        "labels", '``"labels"`` or ``"teacher_argmax"`` (the teacher\'s top token as the hard target).'
    )
    label_weight: float = _keyword(
        0.0,
        "weight w in [0, 1] of ``labels`` in a hard term on the teacher's argmax: with"
        ' ``hard_labels="teacher_argmax"`` the hard term is (1 - w) CE(student, teacher argmax) + w CE(student,'
        " labels), both from one pass (w=0.5: DeiT's hard distillation); 1 leaves the argmax term out. No effect"
        ' with ``hard_labels="labels"``.',
    )
    teacher_ce_weight: float = _keyword(0.0, "weight ≥ 0 of the teacher's cross-entropy (co-distillation).")
    vocab_size: int | None = _keyword(
        None,
        "number of real tokens; columns at or past it are padding, excluded from both softmaxes. Required"
        " when the two last dimensions differ.",
    )
    ignore_index: int = _keyword(-100, "label value of positions to skip.")
    reduction: str = _keyword(
        "mean",
        '``"mean"`` over counted tokens (0 when there are none), ``"sum"``, or ``"none"`` (per-position'
        " losses in the leading shape, 0 at ignored positions).",
    )
    backend: str = _keyword("auto", '``"auto"`` (Triton for CUDA tensors, else PyTorch), ``"triton"`` or ``"torch"``.')

    def __post_init__(self) -> None:
        _choice("divergence", self.divergence, DIVERGENCES)
        _choice("reduction", self.reduction, REDUCTIONS)
        _choice("hard_labels", self.hard_labels, HARD_LABEL_SOURCES)
        normalized = {
            "beta": _unit_interval("beta", self.beta),
            "skew": _unit_interval("skew", self.skew),
            "alpha": _unit_interval("alpha", self.alpha),
            "label_weight": _unit_interval("label_weight", self.label_weight),
            "temperature": _number("temperature", self.temperature),
        }
        if not (normalized["temperature"] > 0 and math.isfinite(normalized["temperature"])):
            raise ValueError(f"temperature must be a finite number > 0, got {normalized['temperature']}")
        normalized["teacher_ce_weight"] = weight = _number("teacher_ce_weight", self.teacher_ce_weight)
        if not (weight >= 0 and math.isfinite(weight)):
            raise ValueError(f"teacher_ce_weight must be a finite number >= 0, got {weight}")
        vocab_size = self.vocab_size
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
            raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
        if vocab_size is not None and vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        _choice("backend", self.backend, BACKENDS)
        normalized["t2_scaling"] = bool(self.t2_scaling)
        for name, value in normalized.items():
            object.__setattr__(self, name, value)  # frozen: store the normalized values once

    @property
    def resolved_divergence(self) -> str:
        """The divergence the backends compute: ``jsd`` with beta 0 or 1 is ``forward_kl`` / ``reverse_kl``.

        That is the TRL / Liger convention; the formula itself would give the degenerate 0.
        """
        if self.divergence == "jsd" and self.beta in (0.0, 1.0):
            return "forward_kl" if self.beta == 0.0 else "reverse_kl"
        return self.divergence

    @property
    def mix(self) -> float:
        """The beta (jsd) or skew (skew divergences) that :attr:`resolved_divergence` uses; 0 for the others."""
        return {"jsd": self.beta, "skew_forward_kl": self.skew, "skew_reverse_kl": self.skew}.get(
            self.resolved_divergence, 0.0
        )

    @property
    def argmax_target(self) -> bool:
        """Whether the hard term's one-hot target is the teacher's argmax: ``teacher_argmax`` with label_weight < 1
        (at 1 the argmax term is left out, not multiplied by 0, which would make an infinite one NaN)."""
        return self.hard_labels == "teacher_argmax" and self.label_weight < 1.0

    @property
    def label_mix(self) -> float:
        """The labels' share w of a hard term on the teacher's argmax, ``(1 - w) CE(argmax) + w CE(labels)``:
        ``label_weight`` when strictly between 0 and 1 with ``hard_labels="teacher_argmax"``, else 0 (one target)."""
        return self.label_weight if self.argmax_target else 0.0

    @property
    def divergence_code(self) -> int:
        """The Triton kernels' code of :attr:`resolved_divergence`."""
        return DIVERGENCE_CODES[self.resolved_divergence]

    @property
    def soft_scale(self) -> float:
        """Factor on the divergence: T² (Hinton) keeps the soft gradient's size independent of T."""
        return self.temperature**2 if self.t2_scaling else 1.0


#: The keyword names, in signature order.
LOSS_KEYWORDS = tuple(f.name for f in fields(LossOptions))


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, allowed))}")


def _number(name: str, value: object) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _unit_interval(name: str, value: object) -> float:
    value = _number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")
    return value


def loss_keywords(target):
    """Decorator: give an entry point every :class:`LossOptions` field as an explicit parameter.

    On a function, its trailing ``**options`` becomes one keyword-only parameter per field (default and type
    from the field) in ``inspect.signature`` and ``__annotations__`` (so ``typing.get_type_hints`` and
    jsonargparse see real types). On a class, the same happens to ``__init__``'s ``**options`` with ordinary
    positional-or-keyword parameters. A docstring line starting with ``**options:`` (the class's docstring for
    a class) is replaced by one ``name: doc`` entry per field.

    Calls are bound against the new signature first, so a misspelled keyword is the usual ``TypeError``;
    ``**options`` then receives every keyword, defaults filled in, unvalidated (``LossOptions(**options)``
    validates them).
    """
    if isinstance(target, type):
        target.__init__ = _with_keywords(target.__init__, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        target.__doc__ = _document_keywords(target.__doc__)
        return target
    return _with_keywords(target, inspect.Parameter.KEYWORD_ONLY)


def _with_keywords(fn, kind: inspect._ParameterKind):
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
        raise TypeError(f"{fn.__qualname__} must end with a **options parameter to take the loss keywords")
    var_keyword = params.pop().name
    if any(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL) for p in params):
        raise TypeError(f"{fn.__qualname__}: only keyword-passable parameters can precede **{var_keyword}")
    types = typing.get_type_hints(LossOptions)
    keywords = [
        inspect.Parameter(f.name, kind, default=f.default, annotation=types[f.name]) for f in fields(LossOptions)
    ]
    signature = inspect.signature(fn).replace(parameters=params + keywords)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:  # worded as Python words it for a plain function
            raise TypeError(f"{fn.__qualname__}() {error}") from None
        bound.apply_defaults()
        return fn(**bound.arguments)

    annotations = {k: v for k, v in fn.__annotations__.items() if k not in (var_keyword, "return")}
    annotations.update({p.name: p.annotation for p in keywords})
    if "return" in fn.__annotations__:
        annotations["return"] = fn.__annotations__["return"]
    wrapper.__annotations__ = annotations
    wrapper.__signature__ = signature
    wrapper.__doc__ = _document_keywords(fn.__doc__)
    return wrapper


def _document_keywords(doc: str | None) -> str | None:
    """Replace the ``**options:`` line of a Google-style Args section by one entry per keyword."""
    if doc is None:
        return None
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("**options:"):
            indent = line[: len(line) - len(line.lstrip())]
            entries = [
                textwrap.fill(
                    f"{f.name}: {f.metadata['doc']}", 116, initial_indent=indent, subsequent_indent=indent + "    "
                )
                for f in fields(LossOptions)
            ]
            return "\n".join([*lines[:i], *entries, *lines[i + 1 :]]) + ("\n" if doc.endswith("\n") else "")
    return doc
