"""The vocabulary map from a teacher's tokenizer to a student's, on bytes ("binned").

Every teacher id maps to one student id (or to ``DROP``), so binning the teacher's probabilities through the map
conserves their mass. The rules, in order:

1. Special tokens (``all_special_ids``, added tokens with ``special=True``, zero-width tokens) by role: the teacher's
   EOS, BOS, UNK, PAD map to the student's token of that role (an id with several roles takes the first in that
   order, so a PAD that is the EOS stays an EOS); then a student special of the same text (``<|im_end|>`` on both);
   else the student's EOS (a control token the student lacks still ends what came before; DROP when the student
   has no EOS). Only that fallback is not exact.
2. Exact: the student token with the same piece string and bytes (identical tokenizers map to the identity), else
   one with the same bytes: a real piece before a byte-fallback ``<0xNN>`` (the student's tokenizer emits ``▁``,
   never ``<0x20>``, for a space; the lowest id would pick ``<0x20>``), then the lowest id.
3. Binned: the first piece of the student's tokenization (one batched call, no special tokens) of the token's whole
   characters (all of its bytes, or those before a character it cuts: ``b"na\xc3"`` reads ``"na"``). A lone ``▁`` the
   student put before text without a leading space (SentencePiece's dummy prefix) is skipped. A first piece whose
   bytes are not a prefix of the teacher's (the dummy prefix merged into it, a normalizer, ``<unk>``) gives way to
   the longest student token that is a prefix.
4. Binned, bytes that start inside or at a cut character (no whole character first): the student's token for the
   first byte (ByteLevel, or byte-fallback ``<0xNN>``), else the longest prefix; with none, its UNK, else DROP.
5. Ids from ``len(teacher_tokenizer)`` to ``teacher_vocab_size`` (a padded head: Qwen3 has 151,936 logits for 151,669
   tokens) map to ``DROP`` (-1): :meth:`VocabularyMap.bin_probs` drops their mass; a loss should zero them.

Cached per pair in ``<cache_dir>/vocab-maps/<teacher_hash[:16]>-<student_hash[:16]>/vocab_map.{npz,json}``, keyed by
both ``tokenizer_hash`` es: vocabularies only, so one vocabulary under two pre-tokenizers shares an entry.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..cache_dir import default_cache_dir, writable_dir
from ..tokenizers import tokenizer_hash
from .token_bytes import token_bytes

DROP = -1
#: the order in which a teacher id holding several roles picks one (EOS first: pad == eos is an EOS)
ROLES = ("eos_token_id", "bos_token_id", "unk_token_id", "pad_token_id")
FORMAT = 1  # bump when the rules change: older cache entries are rebuilt
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_BATCH = 8192  # texts per student tokenizer call
_BAR_FROM = 20_000  # binned tokens from which the build shows a progress bar


@dataclass(frozen=True, eq=False)
class VocabularyMap:
    """Teacher id -> student id, for binning the teacher's distribution into the student's vocabulary.

    Attributes:
        teacher_to_student: ``int64 [teacher_vocab_size]``, a student id or ``DROP`` (-1).
        exact: ``bool [teacher_vocab_size]``, the teacher ids whose bytes (or special role) the student has.
        student_vocab_size: ``len(student_tokenizer)``, the width :meth:`bin_probs` returns by default.
        teacher_tokens: ``len(teacher_tokenizer)``; ids from there on are head padding.
        teacher_hash, student_hash: the tokenizers' vocabulary hashes.
    """

    teacher_to_student: np.ndarray
    exact: np.ndarray
    student_vocab_size: int
    teacher_tokens: int
    teacher_hash: str
    student_hash: str
    _tensors: dict = field(default_factory=dict, init=False, repr=False)  # device -> (kept ids, targets, exact mask)

    @property
    def teacher_vocab_size(self) -> int:
        return len(self.teacher_to_student)

    @property
    def overlap(self) -> int:  # how many teacher ids map exactly
        return int(self.exact.sum())

    def report(self) -> dict[str, Any]:
        """Counts for logs: exact, binned (to a first piece or byte), dropped, and the exact share of real tokens."""
        real, exact = self.teacher_to_student[: self.teacher_tokens], int(self.exact[: self.teacher_tokens].sum())
        return {
            "teacher_tokens": self.teacher_tokens, "teacher_vocab_size": self.teacher_vocab_size, "exact": exact,
            "student_tokens": self.student_vocab_size, "exact_share": exact / max(self.teacher_tokens, 1),
            "binned": int((real >= 0).sum()) - exact, "dropped": int((real < 0).sum()),
            "padded": self.teacher_vocab_size - self.teacher_tokens,
        }  # fmt: skip

    def _on(self, teacher) -> tuple:
        """(kept teacher ids, their student ids, exact mask) on ``teacher``'s device, after checking its width."""
        if teacher.shape[-1] != self.teacher_vocab_size:
            raise ValueError(
                f"the teacher's last dimension has {teacher.shape[-1]} entries, the vocabulary map"
                f" {self.teacher_vocab_size} (teacher_vocab_size): build the map with the teacher head's width"
            )
        if isinstance(teacher, np.ndarray):
            return None, None, self.exact
        if (device := teacher.device) not in self._tensors:  # copied to the device once, not per batch
            kept = np.flatnonzero(self.teacher_to_student >= 0)
            arrays = kept, self.teacher_to_student[kept], self.exact
            self._tensors[device] = tuple(torch.from_numpy(a).to(device) for a in arrays)
        return self._tensors[device]

    def exact_mass(self, teacher_probs):
        """The teacher's probability mass on exactly mapped tokens: ``[..., Vt]`` -> ``[...]`` (numpy or torch)."""
        return teacher_probs[..., self._on(teacher_probs)[2]].sum(-1)

    def bin_probs(self, teacher_probs: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
        """Scatter-add the teacher's probabilities into the student's vocabulary.

        Args:
            teacher_probs: ``[..., teacher_vocab_size]`` probabilities.
            vocab_size: the output width, at least ``student_vocab_size`` (a padded student head); default that.

        Returns:
            ``[..., vocab_size]`` in ``teacher_probs``' dtype promoted to at least float32. Its sum over the last
            dimension equals the input's sum over the ids not mapped to ``DROP`` (head padding loses its mass).
        """
        width = self.student_vocab_size if vocab_size is None else vocab_size
        if width < self.student_vocab_size:
            raise ValueError(f"vocab_size={width} is narrower than the student's {self.student_vocab_size} tokens")
        kept, targets, _ = self._on(teacher_probs)
        source = teacher_probs.index_select(-1, kept).to(torch.promote_types(teacher_probs.dtype, torch.float32))
        out = source.new_zeros((*teacher_probs.shape[:-1], width))
        return out.scatter_add_(-1, targets.expand(source.shape), source)

    def binned_topk(
        self, teacher_logprobs: torch.Tensor, k: int, vocab_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` likeliest student tokens after binning: the sparse teacher that ``sparse_distillation_loss`` reads.

        Args:
            teacher_logprobs: ``[..., teacher_vocab_size]`` log-probabilities (at the distillation temperature).
            k: slots per position, at most the output width.
            vocab_size: as in :meth:`bin_probs`.

        Returns:
            ``(ids, logprobs)``, both ``[..., k]`` sorted likeliest first: ``int64`` student ids with -1 for an empty
            slot (fewer than ``k`` student tokens got any mass), and the binned log-probabilities (-inf when empty).
            Not renormalized: the slots hold what the teacher put there, the rest is the tail.
        """
        values, ids = self.bin_probs(teacher_logprobs.exp(), vocab_size).topk(k, dim=-1)
        empty = values <= 0
        return ids.masked_fill(empty, DROP), values.log().masked_fill(empty, -float("inf"))


def build_vocabulary_map(
    teacher_tokenizer, student_tokenizer, teacher_vocab_size: int | None = None, cache_dir: str | Path | None = None
) -> VocabularyMap:
    """The map from ``teacher_tokenizer``'s ids to ``student_tokenizer``'s, read from the cache or built and cached.

    Args:
        teacher_tokenizer, student_tokenizer: fast tokenizers whose bytes :func:`~.token_bytes.token_bytes` reads.
        teacher_vocab_size: the teacher head's width, at least ``len(teacher_tokenizer)`` (the default).
        cache_dir: the cache root (default :func:`~lit_distill.data.cache_dir.default_cache_dir`).

    Raises:
        ValueError: ``teacher_vocab_size`` below the tokenizer's size; a cache entry written for other tokenizers
            (naming both pairs of hashes); tokenizers whose bytes cannot be read.
    """
    size = len(teacher_tokenizer)
    teacher_vocab_size = size if teacher_vocab_size is None else int(teacher_vocab_size)
    if teacher_vocab_size < size:
        raise ValueError(f"teacher_vocab_size={teacher_vocab_size} is below the teacher tokenizer's {size} tokens")
    hashes = tokenizer_hash(teacher_tokenizer), tokenizer_hash(student_tokenizer)
    directory = Path(cache_dir or default_cache_dir()) / "vocab-maps" / f"{hashes[0][:16]}-{hashes[1][:16]}"
    # what the vocabulary hashes miss but the map depends on: the special roles, the sizes and the rules
    settings = {
        "format": FORMAT, "teacher_roles": _roles(teacher_tokenizer), "student_roles": _roles(student_tokenizer),
        "teacher_tokens": size, "student_tokens": len(student_tokenizer),
    }  # fmt: skip
    arrays = _load(directory, hashes, settings)
    if arrays is None:
        arrays = _build(teacher_tokenizer, student_tokenizer)
        _save(directory, arrays, hashes, settings)
    (mapping, exact), pad = arrays, teacher_vocab_size - size  # the cache holds the tokenizer's ids, unpadded
    return VocabularyMap(
        np.concatenate([mapping, np.full(pad, DROP, np.int64)]), np.concatenate([exact, np.zeros(pad, bool)]),
        len(student_tokenizer), size, *hashes,
    )  # fmt: skip


def _roles(tokenizer) -> dict[str, int | None]:
    return {role: getattr(tokenizer, role, None) for role in ROLES}


def _specials(tokenizer, table: list[bytes]) -> set[int]:
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added | {i for i, b in enumerate(table) if not b}


def _build(teacher, student) -> tuple[np.ndarray, np.ndarray]:
    t_bytes, s_bytes = token_bytes(teacher), token_bytes(student)
    t_pieces = teacher.convert_ids_to_tokens(list(range(len(t_bytes))))
    s_pieces, s_vocab = student.convert_ids_to_tokens(list(range(len(s_bytes)))), student.get_vocab()
    # real pieces before byte-fallback ones, then by id; reversed so that the first in that order is written last
    order = sorted(range(len(s_bytes)), key=lambda j: (bool(_BYTE_PIECE.fullmatch(s_pieces[j] or "")), j))
    by_bytes = {s_bytes[j]: j for j in reversed(order) if s_bytes[j]}
    mapping, exact = np.full(len(t_bytes), DROP, np.int64), np.zeros(len(t_bytes), bool)
    specials, binned = _specials(teacher, t_bytes), []
    for i, b in enumerate(t_bytes):
        if i in specials:
            continue
        same = s_vocab.get(t_pieces[i])
        j = same if same is not None and s_bytes[same] == b else by_bytes.get(b)
        if j is None:
            binned.append(i)
        else:
            mapping[i], exact[i] = j, True
    _map_specials(teacher, student, specials, _specials(student, s_bytes), mapping, exact)
    _map_binned(binned, t_bytes, s_bytes, by_bytes, student, mapping)
    return mapping, exact


def _map_specials(teacher, student, specials: set[int], s_specials: set[int], mapping, exact) -> None:
    """Rule 1 of the module docstring."""
    t_roles, s_roles = _roles(teacher), _roles(student)
    s_by_text = {student.convert_ids_to_tokens(j): j for j in sorted(s_specials, reverse=True)}  # lowest id wins
    eos = s_roles["eos_token_id"]
    for i in specials:
        j = s_roles.get(next((r for r in ROLES if t_roles[r] == i), None))
        j = s_by_text.get(teacher.convert_ids_to_tokens(i)) if j is None else j
        mapping[i], exact[i] = (j, True) if j is not None else (DROP if eos is None else eos, False)


def _map_binned(ids: list[int], t_bytes, s_bytes, by_bytes: dict[bytes, int], student, mapping) -> None:
    """Rules 3 and 4 of the module docstring, with one batched student tokenizer call over all the texts."""
    ends = {i: _whole_characters(t_bytes[i]) for i in ids}
    texted = [i for i in ids if ends[i]]
    texts = [t_bytes[i][: ends[i]].decode("utf-8") for i in texted]
    fallback = DROP if getattr(student, "unk_token_id", None) is None else student.unk_token_id
    for i, pieces in zip(texted, _encode(student, texts), strict=True):
        b = t_bytes[i]
        if pieces and s_bytes[pieces[0]] == b" " and not b.startswith(b" "):
            pieces = pieces[1:]  # SentencePiece's dummy prefix
        first = s_bytes[pieces[0]] if pieces else b""
        mapping[i] = pieces[0] if first and b.startswith(first) else _longest_prefix(b, by_bytes, fallback)
    for i in (i for i in ids if not ends[i]):
        single = by_bytes.get(t_bytes[i][:1])
        mapping[i] = single if single is not None else _longest_prefix(t_bytes[i], by_bytes, fallback)


def _whole_characters(b: bytes) -> int:  # how many leading bytes are whole UTF-8 characters
    try:
        b.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start
    return len(b)


def _longest_prefix(b: bytes, by_bytes: dict[bytes, int], fallback: int) -> int:  # the student's, else fallback
    return next((by_bytes[b[:end]] for end in range(len(b), 0, -1) if b[:end] in by_bytes), fallback)


def _encode(student, texts: list[str]) -> list[list[int]]:
    from tqdm.auto import tqdm

    out: list[list[int]] = []
    with tqdm(total=len(texts), desc="mapping the vocabulary", unit=" tokens", disable=len(texts) < _BAR_FROM) as bar:
        for start in range(0, len(texts), _BATCH):
            chunk = texts[start : start + _BATCH]
            out.extend(student(chunk, add_special_tokens=False)["input_ids"])
            bar.update(len(chunk))
    return out


def _load(directory: Path, hashes: tuple[str, str], settings: dict) -> tuple[np.ndarray, np.ndarray] | None:
    meta_path, arrays_path = directory / "vocab_map.json", directory / "vocab_map.npz"
    if not (meta_path.exists() and arrays_path.exists()):
        return None
    stored = (meta := json.loads(meta_path.read_text())).get("teacher_hash"), meta.get("student_hash")
    if stored != hashes:
        raise ValueError(
            f"{directory} holds a vocabulary map cache from other tokenizers (teacher {stored[0]}, student"
            f" {stored[1]}), not from the teacher {hashes[0]} and the student {hashes[1]} given: delete that"
            " directory, or pass another cache_dir"
        )
    if meta.get("settings") != settings:
        return None  # same vocabularies, other special roles or an older format: rebuilt and overwritten
    with np.load(arrays_path) as data:
        mapping, exact = data["teacher_to_student"].astype(np.int64), data["exact"].astype(bool)
    return (mapping, exact) if len(mapping) == len(exact) == settings["teacher_tokens"] else None


def _save(directory: Path, arrays: tuple[np.ndarray, np.ndarray], hashes: tuple[str, str], settings: dict) -> None:
    """Arrays first, then the JSON that vouches for them, each whole or not at all (temp file, then os.replace)."""
    writable_dir(directory)
    meta = {"teacher_hash": hashes[0], "student_hash": hashes[1], "settings": settings}
    for name, write in (
        ("vocab_map.npz", lambda f: np.savez(f, teacher_to_student=arrays[0], exact=arrays[1])),
        ("vocab_map.json", lambda f: f.write(json.dumps(meta, indent=1, sort_keys=True).encode() + b"\n")),
    ):
        tmp = directory / f"{name}.{os.getpid()}.tmp"  # one per process: two builds of one pair do not collide
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, directory / name)
