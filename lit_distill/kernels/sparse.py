"""Distillation from a sparse teacher (K token ids per position with their log-probabilities): the public
functions. The per-row math is in ``sparse_rows.py``, the PyTorch path in ``sparse_torch.py``, the kernels in
``sparse_triton.py``, the fused-linear form's chunk loop in ``sparse_linear.py``.
"""

from __future__ import annotations

from dataclasses import fields

import torch

from .backend import use_triton
from .inputs import check_labels
from .linear_plan import choose_chunk_size, head
from .options import LossOptions
from .rows import DistillationOutput
from .sparse_linear import FusedLinearSparse, plan_keywords
from .sparse_torch import torch_sparse_loss

__all__ = ["fused_linear_sparse_distillation_loss", "sparse_distillation_loss"]

#: The divergences defined over the K + 1 buckets of ``tail=True``.
TAIL_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
OPTION_NAMES = {f.name for f in fields(LossOptions)}


def sparse_distillation_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    tail: bool = False,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scaling: bool = True,
    alpha: float = 1.0,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> DistillationOutput:
    """Distillation loss against a teacher given as K token ids and their log-probabilities per position.

    The student is ``q = softmax(student / T)`` over the real vocabulary. With ``tail=False`` the target is
    the slots' probabilities renormalized over the non-empty slots (top-k targets; sampled weights already sum
    to 1) and the soft term is KL(target ‖ q), forward KL only. With ``tail=True`` both sides get K + 1
    buckets: the slots, and the rest of the mass, ``max(0, 1 - sum p)`` for the teacher and the student's
    probability summed over the tokens outside the slots (summed directly, never ``1 - sum q``, which
    cancels when the student is confident); the soft term is forward KL, reverse KL, jsd (``beta``) or tvd
    over the buckets. As in :func:`~lit_distill.kernels.distillation_loss`: the T² factor, ``alpha`` times
    the soft term plus ``1 - alpha`` times the student's cross-entropy on ``labels`` at T=1, ``ignore_index``
    and the reductions. A row with no non-empty slot (or, with ``tail=False``, only ``-inf`` log-probs) has
    a soft term of 0 and no soft gradient.

    Non-finite values: ``-inf`` log-probabilities are slots of probability 0. A bucket with mass on one side
    only makes a KL +inf and the row's gradient NaN, as in the dense loss: forward KL at a slot with teacher
    mass where the student's logit is ``-inf``, reverse KL where the teacher's tail is 0 (slots summing to 1)
    and the student's is not. NaN in a counted row propagates; log-probabilities above 0 are not checked.

    Args:
        student_logits: ``(..., V)`` floating logits; gets the gradient.
        teacher_ids: ``(..., K)`` integer token ids in ``[0, vocab)``, ``-1`` for an empty slot. Duplicate ids
            in a row are an error; on CUDA a device-side assert (a sort of the ``[N, K]`` ids, no host sync).
        teacher_logprobs: ``(..., K)`` floating log-probabilities of those tokens at the temperature T.
        labels: ``(...)`` integer targets for the cross-entropy, or None.
        tail: add the remaining-mass bucket on both sides (see above).
        divergence: ``forward_kl``; with ``tail=True`` also ``reverse_kl``, ``jsd`` or ``tvd``.
        beta: jsd mixing weight in [0, 1] (0 is forward KL, 1 reverse KL).
        temperature: T > 0 of the student's softmax in the soft term (the teacher's is baked in).
        t2_scaling: multiply the soft term by T².
        alpha: weight in [0, 1] of the soft term; the cross-entropy gets ``1 - alpha``.
        vocab_size: number of real tokens; logit columns at or past it are padding.
        ignore_index: label value of positions that count for nothing.
        reduction: ``"mean"`` over counted positions, ``"sum"`` or ``"none"``.
        backend: ``"auto"`` (Triton for CUDA tensors), ``"triton"`` or ``"torch"``.

    Returns:
        :class:`DistillationOutput`: ``teacher_ce`` is NaN (there are no teacher logits), ``agreement`` the
        fraction of counted positions where the student's argmax is the teacher's most likely slot.

    Raises:
        ValueError: ids outside ``[-1, vocab)``, duplicate ids, mismatched shapes or devices, ``tail=False``
            with a divergence other than forward KL, and the option errors of ``distillation_loss``.
        TypeError: non-integer ids, non-floating logits or log-probabilities.
    """
    opts = _options(locals())
    _check_tensor("student_logits", student_logits, floating=True)
    lead, width = student_logits.shape[:-1], student_logits.shape[-1]
    vocab = _vocab(width, opts)
    ids, logprobs, labels = _check_teacher(
        teacher_ids, teacher_logprobs, labels, lead, vocab, student_logits.device, opts
    )
    student = student_logits.reshape(-1, width)
    student = student if student.stride(-1) == 1 else student.contiguous()
    if use_triton(opts.backend, student):
        from .sparse_triton import triton_sparse_loss

        out = triton_sparse_loss(student, ids, logprobs, labels, opts, tail, vocab)
    else:
        out = torch_sparse_loss(student, ids, logprobs, labels, opts, tail, vocab)
    return out._replace(loss=out.loss.reshape(lead)) if reduction == "none" else out


def fused_linear_sparse_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    tail: bool = False,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    t2_scaling: bool = True,
    alpha: float = 1.0,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
) -> DistillationOutput:
    """:func:`sparse_distillation_loss` of ``student_hidden @ student_weight.T + student_bias`` logits, which
    only ever exist ``chunk_size`` tokens at a time, in fp32 for half-precision inputs, as in
    :func:`~lit_distill.kernels.fused_linear_distillation_loss` (the same projection and memory plan).

    Args:
        student_hidden: ``(..., H)`` hidden states. student_weight: ``(V, H)``. student_bias: ``(V,)`` or None.
        teacher_ids, teacher_logprobs, labels: as in :func:`sparse_distillation_loss`, leading shape ``(...)``.
        chunk_size: tokens per chunk; None picks it from the fused-linear memory budget
            (:func:`.linear_plan.choose_chunk_size`).
        The keywords: as in :func:`sparse_distillation_loss`.

    Returns:
        :class:`DistillationOutput`; gradients reach the hidden states, weight and bias. Each chunk's logit
        gradient is folded into them in the forward (``dH = G W``, ``dW += Gᵀ H``, ``db += Σ G``) and the
        backward only scales them by ``grad_output``, except with ``reduction="none"``, which recomputes.
        The logit gradient is computed in fp32 and rounded once to the matmul dtype for those matmuls. Under
        autocast the matmuls take the autocast dtype (a copy of the weight in it; the bias stays in the
        logits' fp32), and the gradients come back in the parameters' dtypes, dW summed in fp32 for fp32
        weights.
    """
    opts = _options(locals())
    for name, x in (("student_hidden", student_hidden), ("student_weight", student_weight)):
        _check_tensor(name, x, floating=True)
    if student_weight.dim() != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        shapes = f"student_hidden {tuple(student_hidden.shape)} and student_weight {tuple(student_weight.shape)}"
        raise ValueError(f"{shapes} do not match: the weight must be (vocab, hidden)")
    if student_bias is not None and tuple(student_bias.shape) != (student_weight.shape[0],):
        raise ValueError(f"student_bias {tuple(student_bias.shape)} must have shape ({student_weight.shape[0]},)")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    lead = student_hidden.shape[:-1]
    vocab = _vocab(student_weight.shape[0], opts)
    ids, logprobs, labels = _check_teacher(
        teacher_ids, teacher_logprobs, labels, lead, vocab, student_hidden.device, opts
    )
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    triton = use_triton(opts.backend, hidden)
    tensors = (hidden, student_weight, student_bias)
    want = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors)
    device_type = hidden.device.type  # under autocast the matmuls take its dtype, as nn.Linear's would
    cast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    side = head(student_weight, student_bias, cast, want)
    if chunk_size is None:
        t1 = labels is not None and opts.temperature != 1.0
        plan = plan_keywords(side, t1, device_type=device_type, triton=triton)
        chunk_size = choose_chunk_size(hidden.shape[0], side, **plan)
    out = FusedLinearSparse.apply(*tensors, ids, logprobs, labels, opts, tail, vocab, chunk_size, triton, side)
    out = DistillationOutput(*out)
    return out._replace(loss=out.loss.reshape(lead)) if reduction == "none" else out


def _options(arguments: dict) -> LossOptions:
    """The validated options from a public function's ``locals()`` (its keywords are LossOptions fields)."""
    tail = arguments["tail"]
    opts = LossOptions(**{k: v for k, v in arguments.items() if k in OPTION_NAMES})
    if not isinstance(tail, bool):
        raise TypeError(f"tail must be a bool, got {type(tail).__name__}")
    allowed = TAIL_DIVERGENCES if tail else ("forward_kl",)
    if opts.divergence not in allowed:
        hint = "" if tail else "; the other divergences need the tail bucket: pass tail=True"
        raise ValueError(
            f"divergence {opts.divergence!r} is not defined for sparse teachers with tail={tail}: use"
            f" {' or '.join(map(repr, allowed))}{hint}"
        )
    return opts


def _check_tensor(name: str, x, *, floating: bool) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., size) with size > 0, got {tuple(x.shape)}")


def _vocab(width: int, opts: LossOptions) -> int:
    if opts.vocab_size is not None and opts.vocab_size > width:
        raise ValueError(f"vocab_size={opts.vocab_size} is larger than the student's vocabulary dimension {width}")
    return opts.vocab_size or width


def _check_teacher(ids, logprobs, labels, lead, vocab, device, opts):
    """Validated ``[N, K]`` ids (int64) and log-probabilities and ``[N]`` labels."""
    _check_tensor("teacher_ids", ids, floating=False)
    _check_tensor("teacher_logprobs", logprobs, floating=True)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"teacher_ids must be an integer tensor (e.g. torch.long), got {ids.dtype}")
    if ids.shape != logprobs.shape:
        shapes = f"teacher_ids {tuple(ids.shape)} and teacher_logprobs {tuple(logprobs.shape)}"
        raise ValueError(f"{shapes} must have the same shape (..., K)")
    if ids.shape[:-1] != lead:
        raise ValueError(f"teacher_ids {tuple(ids.shape)} must have the student's leading shape {tuple(lead)} plus K")
    for name, x in (("teacher_ids", ids), ("teacher_logprobs", logprobs)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the student on {device}; move them together")
    if labels is None and opts.alpha < 1.0:
        raise ValueError(f"alpha={opts.alpha} < 1 mixes in the student's cross-entropy on labels, but labels is None")
    labels = check_labels(labels, lead, vocab, device, opts, what="the student's leading shape")
    ids = ids.reshape(-1, ids.shape[-1]).long()
    _check_ids(ids, vocab)
    return ids, logprobs.reshape(ids.shape), labels


def _check_ids(ids: torch.Tensor, vocab: int) -> None:
    """Ids in [-1, vocab) and no id twice in a row: a device-side assert on CUDA (no host sync)."""
    out_of_range = (ids < -1) | (ids >= vocab)
    ordered = ids.sort(-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if ids.is_cuda:
        torch._assert_async(~out_of_range.any(), "teacher_ids outside [-1, vocab_size)")
        torch._assert_async(~repeated.any(), "teacher_ids repeat a token within a position")
        return
    if out_of_range.any():
        bad = int(ids[out_of_range][0])
        raise ValueError(f"teacher id {bad} is outside [-1, {vocab}): a token of the student's vocabulary or -1")
    if repeated.any():
        row = int(repeated.any(-1).nonzero()[0])
        token = int(ordered[row, 1:][repeated[row]][0])
        raise ValueError(
            f"teacher_ids repeat token {token} at position {row} (flattened); each slot must hold a"
            " distinct token (merge duplicates by adding their probabilities)"
        )
