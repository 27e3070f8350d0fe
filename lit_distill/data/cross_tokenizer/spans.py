"""One row's byte-aligned pairs and chunks, from the groups :func:`~.align.align` finds (numpy; the collator in
``collate.py`` calls these per row, in DataLoader workers).

Coordinates are token indices of the unpadded row; a *pair* is two prediction positions (the last token each side
has read) where both sides have read the same bytes; a *chunk* is one alignment group's tokens on both sides.
"""

from __future__ import annotations

import numpy as np

#: how many UTF-8 bytes a character has, by its lead byte's high bits (continuation bytes: 0)
_CONTINUATION = 0x80


def leading_partial(data: bytes) -> int:
    """Bytes at the start of ``data`` that continue a character begun before it (a row cut mid-character)."""
    count = 0
    while count < min(3, len(data)) and data[count] & 0xC0 == _CONTINUATION:
        count += 1
    return count


def trailing_partial(data: bytes) -> int:
    """Bytes at the end of ``data`` of a character it does not finish (0 when it ends on a boundary)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != _CONTINUATION:
            want = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return back if want > back else 0
    return 0


def counted_spans(labels: np.ndarray, ignore_index: int) -> np.ndarray:
    """``int64 [S, 2]``: the ``[start, end)`` of each maximal run of ``labels != ignore_index``."""
    counted = np.concatenate([[False], np.asarray(labels) != ignore_index, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(counted))
    return edges.reshape(-1, 2).astype(np.int64)


def group_of(size: int, last: np.ndarray) -> np.ndarray:
    """``int64 [size]``: each token's group (how many groups close before it), -1 past the last one."""
    group = np.searchsorted(last, np.arange(size, dtype=np.int64), side="left")
    group[group == last.size] = -1
    return group.astype(np.int64)


def pairs_and_chunks(
    student_group: np.ndarray,
    teacher_group: np.ndarray,
    student_last: np.ndarray,
    teacher_last: np.ndarray,
    counted: np.ndarray,
    extra_pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The row's listed pairs and its chunk ids at each prediction position (see the batch contract).

    Args:
        student_group: ``[n]`` each student token's group, -1 outside every group; groups increase along the row.
        teacher_group: ``[m]`` the same for the teacher.
        student_last: ``[G]`` each group's last student token. teacher_last: ``[G]`` the teacher's.
        counted: ``[n]`` bool, the student's labels that count.
        extra_pairs: (student positions, teacher positions) that are pairs but not group ends (the point just
            before a chat span).

    Returns:
        ``(pair_student [K], pair_teacher [K], student_chunk [n], teacher_chunk [m])``, int64.
    """
    n, m, groups = student_group.size, teacher_group.size, student_last.size
    s_pos, t_pos = student_last, teacher_last
    if extra_pairs is not None:
        s_pos, t_pos = np.concatenate([extra_pairs[0], s_pos]), np.concatenate([extra_pairs[1], t_pos])
    order = np.argsort(s_pos, kind="stable")
    s_pos, t_pos = s_pos[order], t_pos[order]
    target = s_pos + 1
    keep = (s_pos >= 0) & (t_pos >= 0) & (target < n)
    keep[keep] = counted[target[keep]]
    # a chunk: a group that holds no row's first token on either side and whose student tokens all count
    s_in, t_in = student_group >= 0, teacher_group >= 0
    first_s = np.full(groups, n, dtype=np.int64)
    first_t = np.full(groups, m, dtype=np.int64)
    np.minimum.at(first_s, student_group[s_in], np.flatnonzero(s_in))
    np.minimum.at(first_t, teacher_group[t_in], np.flatnonzero(t_in))
    uncounted = np.bincount(student_group[s_in & ~counted], minlength=groups)[:groups]
    listed = (first_s >= 1) & (first_t >= 1) & (uncounted == 0)
    chunk_id = np.where(listed, np.cumsum(listed) - 1, -1)
    return s_pos[keep], t_pos[keep], _chunks_at(student_group, chunk_id), _chunks_at(teacher_group, chunk_id)


def _chunks_at(group: np.ndarray, chunk_id: np.ndarray) -> np.ndarray:
    """At prediction position p, the chunk of token p + 1 (-1 for none; the last position is always -1)."""
    out = np.full(group.size, -1, dtype=np.int64)
    if group.size > 1:
        nxt = group[1:]
        out[:-1] = np.where(nxt >= 0, chunk_id[np.maximum(nxt, 0)] if chunk_id.size else -1, -1)
    return out
