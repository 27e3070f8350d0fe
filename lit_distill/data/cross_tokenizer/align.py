"""Byte-aligned groups between two tokenizations of the same text (student and teacher).

A group closes where both sides end a token at the same byte offset: there both models have read the same bytes,
so the group's last token on each side is a boundary whose prediction (of the next group) can be compared.
This is the two-pointer walk of GOLD's ``_align_by_byte_offsets`` (advance the side whose token ends first, close
when the ends are equal), computed with numpy on sorted keys instead of a Python loop (it runs in DataLoader
workers, per row).

Zero-width tokens (specials: BOS, EOS, chat markup) follow from that walk:

- a zero-width token on one side only joins the group that follows it: a one-sided BOS joins the first group,
  so the other side's first real token can still close group 0 at its position 0;
- zero-width tokens on both sides at the same offset pair up, the k-th with the k-th, and each pair closes a
  group of no bytes: a BOS on both sides is group 0 (position 0 predicts the first real token on both);
- zero-width tokens after the last group on one side only (an EOS the other side lacks, padding) belong to no
  group (group index -1). Pass unpadded rows: pads on both sides would pair up into empty groups.

Truncation: when the byte streams have different lengths, the longer one must start with the shorter (else the
texts differ, ``ValueError``); tokens past the last common boundary belong to no group (-1), so a partial last
group, e.g. one side cut inside a multi-byte character, is dropped. A stream that ends inside a UTF-8 character
is always taken as cut; any other difference in length is an error unless ``truncated=True``.

The SentencePiece dummy prefix (a ``▁`` the text does not have) is dropped with ``student_skip`` /
``teacher_skip``, from :func:`~.token_bytes.added_prefix`: those leading bytes count as zero-width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .token_bytes import text_bytes_of

_CONTEXT = 12  # bytes of context either side of the first difference in the error


@dataclass(frozen=True)
class Alignment:
    """Byte-aligned groups of a student row and a teacher row (``G`` groups, ``n`` student and ``m`` teacher
    tokens). All arrays are int64.

    Attributes:
        student_last: ``[G]`` index of each group's last student token (the student's boundary position).
        teacher_last: ``[G]`` index of each group's last teacher token.
        student_count: ``[G]`` student tokens in each group (zero-width ones included; always >= 1).
        teacher_count: ``[G]`` teacher tokens in each group.
        group_end: ``[G]`` byte offset where each group ends (after the skipped prefix bytes).
        student_group: ``[n]`` group of each student token, -1 for tokens after the last group.
        teacher_group: ``[m]`` group of each teacher token, -1 likewise.
    """

    student_last: np.ndarray
    teacher_last: np.ndarray
    student_count: np.ndarray
    teacher_count: np.ndarray
    group_end: np.ndarray
    student_group: np.ndarray
    teacher_group: np.ndarray

    @property
    def num_groups(self) -> int:
        return len(self.student_last)


def _ids(ids, size: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= size):
        bad = ids[(ids < 0) | (ids >= size)][0]
        raise ValueError(f"token id {bad} is outside the table of {size} tokens (strip ignore_index values first)")
    return ids


def byte_offsets(ids, table: Sequence[bytes] | np.ndarray) -> np.ndarray:
    """``int64 [n]``: the byte offset where each token ends (cumulative byte lengths).

    Args:
        ids: ``[n]`` token ids (list, numpy array or CPU tensor).
        table: :func:`~.token_bytes.token_bytes` of the tokenizer, or its :func:`~.token_bytes.byte_lengths`
            (faster: no Python loop).
    """
    ids = _ids(ids, len(table))
    return np.cumsum(table[ids] if isinstance(table, np.ndarray) else _lengths(ids, table), dtype=np.int64)


def _keys(ends: np.ndarray, scale: int) -> np.ndarray:
    """(end, rank among the tokens ending at that offset) as one sortable int64 per token (rank < scale)."""
    rank = np.arange(ends.size, dtype=np.int64) - np.searchsorted(ends, ends, side="left")
    return ends * scale + rank


def _first_difference(student: bytes, teacher: bytes, skips: tuple[int, int]) -> str | None:
    """Why the two streams cannot be aligned, or None (equal, or one a prefix of the other)."""
    common = min(len(student), len(teacher))
    a = np.frombuffer(student, dtype=np.uint8, count=common)
    b = np.frombuffer(teacher, dtype=np.uint8, count=common)
    diff = np.flatnonzero(a != b)
    if not diff.size:
        return None
    at = int(diff[0])
    lo, hi = max(at - _CONTEXT, 0), at + _CONTEXT
    return (
        f"the student's and teacher's texts differ at byte {at} (after skipping {skips[0]} and {skips[1]} prefix"
        f" bytes): student {student[lo:hi]!r} vs teacher {teacher[lo:hi]!r}"
    )


def _ends_mid_character(data: bytes) -> bool:
    """Whether ``data`` stops inside a UTF-8 character (its last lead byte wants more bytes than follow)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII): how long its character is
            want = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return want > back
    return False


def align(
    student_ids,
    teacher_ids,
    student_table: Sequence[bytes],
    teacher_table: Sequence[bytes],
    *,
    student_skip: int = 0,
    teacher_skip: int = 0,
    truncated: bool = False,
) -> Alignment:
    """Group the two rows' tokens where both end at the same byte offset (see the module docstring).

    Args:
        student_ids: ``[n]`` the student's token ids of the text (unpadded).
        teacher_ids: ``[m]`` the teacher's token ids of the same text.
        student_table: :func:`~.token_bytes.token_bytes` of the student's tokenizer.
        teacher_table: the same for the teacher.
        student_skip: leading bytes of the student's stream the text does not have (the dummy prefix space).
        teacher_skip: the same for the teacher.
        truncated: allow one stream to stop early at a character boundary (rows cut to a token budget).

    Raises:
        ValueError: when the texts differ (the first differing byte offset and a few bytes of each side), when one
            stream is longer without ``truncated`` or a mid-character cut, or for ids outside a table.
    """
    s_ids, t_ids = _ids(student_ids, len(student_table)), _ids(teacher_ids, len(teacher_table))
    s_text = text_bytes_of(s_ids.tolist(), student_table)
    t_text = text_bytes_of(t_ids.tolist(), teacher_table)
    for side, skip, text in (("student", student_skip, s_text), ("teacher", teacher_skip, t_text)):
        if not 0 <= skip <= len(text):
            raise ValueError(f"{side}_skip={skip} is outside the {side}'s {len(text)} bytes")
    s_text, t_text = s_text[student_skip:], t_text[teacher_skip:]
    why = _first_difference(s_text, t_text, (student_skip, teacher_skip))
    if why is not None:
        raise ValueError(why)
    if len(s_text) != len(t_text) and not truncated:
        short = min(s_text, t_text, key=len)
        if not _ends_mid_character(short):
            raise ValueError(
                f"the student's text has {len(s_text)} bytes and the teacher's {len(t_text)}: one stops early"
                " (pass truncated=True if the rows were cut to a token budget)"
            )

    # offsets after the skipped prefix: tokens inside it become zero-width at 0
    s_ends = np.maximum(np.cumsum(_lengths(s_ids, student_table)) - student_skip, 0)
    t_ends = np.maximum(np.cumsum(_lengths(t_ids, teacher_table)) - teacher_skip, 0)
    # the walk closes a group at (i, j) exactly when token i and token j end at the same offset with the same rank
    # among the tokens ending there (zero-width runs pair up in order); keys are sorted, so searchsorted finds them
    scale = max(s_ends.size, t_ends.size) + 1
    s_keys, t_keys = _keys(s_ends, scale), _keys(t_ends, scale)
    at = np.searchsorted(t_keys, s_keys).clip(max=max(t_keys.size - 1, 0))
    hit = t_keys[at] == s_keys if t_keys.size else np.zeros(s_keys.size, dtype=bool)
    student_last = np.flatnonzero(hit).astype(np.int64)
    teacher_last = at[hit].astype(np.int64)
    return Alignment(
        student_last=student_last,
        teacher_last=teacher_last,
        student_count=np.diff(student_last, prepend=-1),
        teacher_count=np.diff(teacher_last, prepend=-1),
        group_end=s_ends[student_last],
        student_group=_group_of(s_ends.size, student_last),
        teacher_group=_group_of(t_ends.size, teacher_last),
    )


def _lengths(ids: np.ndarray, table: Sequence[bytes]) -> np.ndarray:
    return np.fromiter((len(table[i]) for i in ids.tolist()), dtype=np.int64, count=ids.size)


def _group_of(size: int, last: np.ndarray) -> np.ndarray:
    """Each token's group: how many groups close before it, -1 past the last one."""
    group = np.searchsorted(last, np.arange(size, dtype=np.int64), side="left")
    group[group == last.size] = -1
    return group.astype(np.int64)
