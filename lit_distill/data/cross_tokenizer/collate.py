"""Student rows to cross-tokenizer batches: the teacher's tokens of the same text, and the byte-aligned pairs and
chunks between the two (``CrossTokenizerCollator``, run in DataLoader workers).

The batch is the base collate's (``input_ids``, ``attention_mask``, ``labels``; labels are not shifted, the modules
shift) plus, all int64 and right-padded:

- ``teacher_input_ids`` / ``teacher_attention_mask`` ``[B, Tt]``: the teacher's tokens (pad: its pad id, else EOS,
  else 0; mask 0);
- ``boundary_student`` / ``boundary_teacher`` ``[B, K]``: prediction positions where both sides have read the same
  bytes and the student's next token counts (-1 padding);
- ``student_chunk`` ``[B, Ts]`` / ``teacher_chunk`` ``[B, Tt]``: at prediction position p, the row-local id of the
  aligned chunk the token p + 1 belongs to, else -1.

Text rows (no ``teacher_input_ids`` in the sample): the student's bytes are the text; each run between the
student's special tokens is encoded by the teacher (no special tokens added) and aligned on its own, so the
teacher's SentencePiece dummy prefix (and the student's, after a special token: a document start) is skipped per
run; special tokens become the teacher's token of the same role (EOS, BOS, PAD, UNK) as zero-width pairs, or are
dropped when the teacher has no such token. Bytes of a character cut at the row's start or end are skipped.

Chat rows carry the teacher's own rendering (``teacher_input_ids``, ``teacher_labels``; ``length`` and
``teacher_length``, the lengths before ``max_seq_length`` cut them, say which side was cut): the counted spans,
maximal runs of counted labels, are matched in order and only they are aligned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from .align import align
from .spans import counted_spans, group_of, leading_partial, pairs_and_chunks, trailing_partial
from .token_bytes import added_prefix, text_bytes_of, token_bytes

#: the sample keys a chat row's teacher side travels in (kept from the base collate)
TEACHER_KEYS = ("teacher_input_ids", "teacher_labels", "length", "teacher_length")
ROLES = ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id")


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def pad_id(tokenizer) -> int:
    """The teacher's padding: its pad id, else its EOS, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


class CrossTokenizerCollator:
    """Collates student rows and adds the teacher's tokens, pairs and chunks (see the module docstring).

    Picklable (DataLoader workers): the byte tables are built lazily, once per process.

    Args:
        student_tokenizer: the tokenizer of the rows' ``input_ids``.
        teacher_tokenizer: the teacher's.
        base_collate: how the student rows become a batch (default: ``torch``'s ``default_collate``; text rows
            gain ``attention_mask`` of ones and ``labels`` equal to ``input_ids``).
        ignore_index: the label of tokens that do not count.

    Raises:
        ValueError: at call time, naming the row: texts that differ, counted spans whose numbers differ, a row
            that is not UTF-8; tokenizers whose bytes cannot be recovered.
    """

    def __init__(
        self, student_tokenizer, teacher_tokenizer, base_collate: Callable | None = None, ignore_index: int = -100
    ) -> None:
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.base_collate, self.ignore_index = base_collate, ignore_index
        self.teacher_pad = pad_id(teacher_tokenizer)
        self._state: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_state": None}  # each worker builds its own tables

    def _tables(self) -> dict[str, Any]:
        if self._state is None:
            s, t = self.student_tokenizer, self.teacher_tokenizer
            s_table, t_table = token_bytes(s), token_bytes(t)
            roles = {}
            for role in reversed(ROLES):  # EOS wins when one id has two roles (a BPE whose BOS is its EOS)
                if getattr(s, role, None) is not None:
                    roles[int(getattr(s, role))] = getattr(t, role, None)
            probe = s("a", add_special_tokens=False)["input_ids"]
            self._state = {
                "student": s_table,
                "teacher": t_table,
                "special": np.array([len(b) == 0 for b in s_table] + [False]),
                "roles": roles,
                "student_prefix": added_prefix(probe, s_table, "a"),
            }
        return self._state

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        base = [{k: v for k, v in sample.items() if k not in TEACHER_KEYS} for sample in samples]
        batch = dict((self.base_collate or default_collate)(base))
        input_ids = batch["input_ids"]
        if "labels" not in batch:
            batch["labels"] = input_ids.clone()
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(input_ids)
        lengths = [len(sample["input_ids"]) for sample in samples]
        ids = [input_ids[b, : lengths[b]].numpy() for b in range(len(samples))]
        labels = [batch["labels"][b, : lengths[b]].numpy() for b in range(len(samples))]
        if "teacher_input_ids" in samples[0]:
            rows = [self._chat_row(b, ids[b], labels[b], sample) for b, sample in enumerate(samples)]
        else:
            rows = self._text_rows(ids, labels)
        return {**batch, **self._pad(rows, input_ids.shape[1])}

    # ------------------------------------------------------------------------------------------ text rows
    def _text_rows(self, ids: list[np.ndarray], labels: list[np.ndarray]) -> list[tuple]:
        state = self._tables()
        plans, texts = [], []
        for b, row in enumerate(ids):
            plan = self._plan(b, row, state)
            for item in plan:
                if item[0] == "text":
                    texts.append(item[4])
            plans.append(plan)
        encoded = iter(self.teacher_tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        rows = []
        for b, plan in enumerate(plans):
            teacher, s_last, t_last = [], [], []
            for item in plan:
                if item[0] == "special":
                    s_last.append([item[1]])
                    t_last.append([len(teacher)])
                    teacher.append(item[2])
                    continue
                _, start, end, skip, text, cut = item
                t_ids = list(next(encoded))
                t_skip = added_prefix(t_ids, state["teacher"], text)
                try:
                    a = align(ids[b][start:end], t_ids, state["student"], state["teacher"], student_skip=skip,
                              teacher_skip=t_skip, truncated=cut)  # fmt: skip
                except ValueError as err:
                    raise ValueError(f"row {b} of the batch (text {text[:40]!r}...): {err}") from None
                keep = _real_groups(a, skip or t_skip)
                s_last.append(a.student_last[keep] + start)
                t_last.append(a.teacher_last[keep] + len(teacher))
                teacher.extend(t_ids)
            s_last = np.concatenate(s_last).astype(np.int64) if s_last else np.zeros(0, np.int64)
            t_last = np.concatenate(t_last).astype(np.int64) if t_last else np.zeros(0, np.int64)
            teacher = np.asarray(teacher, dtype=np.int64)
            s_group, t_group = group_of(ids[b].size, s_last), group_of(teacher.size, t_last)
            counted = labels[b] != self.ignore_index
            rows.append((teacher, *pairs_and_chunks(s_group, t_group, s_last, t_last, counted)))
        return rows

    def _plan(self, b: int, row: np.ndarray, state: dict[str, Any]) -> list[tuple]:
        """The row as ("special", position, teacher id) and ("text", start, end, student skip, text, cut) items."""
        special = state["special"][np.minimum(row, len(state["special"]) - 1)]
        plan, start = [], 0
        for position in [*np.flatnonzero(special).tolist(), row.size]:
            if position > start:
                data = text_bytes_of(row[start:position].tolist(), state["student"])
                skip = leading_partial(data) if start == 0 else 0
                if start > 0 and state["student_prefix"] and data[:1] == b" ":
                    skip = 1  # the student's dummy prefix of a document that starts after a special token
                cut = position == row.size
                stop = len(data) - (trailing_partial(data) if cut else 0)
                try:
                    text = data[skip:stop].decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"row {b} of the batch: the student's tokens {start}..{position - 1} are not UTF-8 ({err})"
                    ) from None
                plan.append(("text", start, position, skip, text, cut))
            if position < row.size:
                teacher = state["roles"].get(int(row[position]))
                if teacher is not None:  # else dropped: zero-width, it joins the next group
                    plan.append(("special", position, int(teacher)))
            start = position + 1
        return plan

    # ------------------------------------------------------------------------------------------ chat rows
    def _chat_row(self, b: int, ids: np.ndarray, labels: np.ndarray, sample: dict[str, Any]) -> tuple:
        state = self._tables()
        teacher = np.asarray(sample["teacher_input_ids"], dtype=np.int64)
        t_labels = np.asarray(sample["teacher_labels"], dtype=np.int64)
        s_spans, t_spans = counted_spans(labels, self.ignore_index), counted_spans(t_labels, self.ignore_index)
        s_cut = int(sample.get("length", ids.size)) > ids.size
        t_cut = int(sample.get("teacher_length", teacher.size)) > teacher.size
        if len(s_spans) != len(t_spans) and not (
            (s_cut and len(s_spans) < len(t_spans)) or (t_cut and len(t_spans) < len(s_spans))
        ):
            raise ValueError(
                f"row {b} of the batch: the student's rendering has {len(s_spans)} counted spans and the teacher's"
                f" {len(t_spans)} ({_name(self.student_tokenizer)} vs {_name(self.teacher_tokenizer)}); both chat"
                " templates must count the same turns"
            )
        s_group, t_group = np.full(ids.size, -1, np.int64), np.full(teacher.size, -1, np.int64)
        s_last, t_last, before = [], [], ([], [])
        spans = min(len(s_spans), len(t_spans))
        for k, ((a, e), (c, f)) in enumerate(zip(s_spans[:spans], t_spans[:spans], strict=True)):
            s_bytes = text_bytes_of(ids[a:e].tolist(), state["student"])
            t_bytes = text_bytes_of(teacher[c:f].tolist(), state["teacher"])
            s_skip, t_skip = _space_skips(s_bytes, t_bytes)
            try:
                al = align(ids[a:e], teacher[c:f], state["student"], state["teacher"], student_skip=s_skip,
                           teacher_skip=t_skip, truncated=k == spans - 1 and (s_cut or t_cut))  # fmt: skip
            except ValueError as err:
                raise ValueError(f"row {b} of the batch, counted span {k}: {err}") from None
            offset, keep = sum(map(len, s_last)), _real_groups(al, s_skip or t_skip)
            s_span, t_span = group_of(e - a, al.student_last[keep]), group_of(f - c, al.teacher_last[keep])
            s_group[a:e] = np.where(s_span >= 0, s_span + offset, -1)
            t_group[c:f] = np.where(t_span >= 0, t_span + offset, -1)
            s_last.append(al.student_last[keep] + a)
            t_last.append(al.teacher_last[keep] + c)
            before[0].append(a - 1)
            before[1].append(c - 1)
        s_last = np.concatenate(s_last).astype(np.int64) if s_last else np.zeros(0, np.int64)
        t_last = np.concatenate(t_last).astype(np.int64) if t_last else np.zeros(0, np.int64)
        extra = (np.asarray(before[0], np.int64), np.asarray(before[1], np.int64))
        counted = labels != self.ignore_index
        return (teacher, *pairs_and_chunks(s_group, t_group, s_last, t_last, counted, extra))

    # ------------------------------------------------------------------------------------------ the batch
    def teacher_keys(self, rows: list[tuple], width: int) -> dict[str, torch.Tensor]:
        """The padded teacher keys of rows aligned elsewhere (on-policy continuations): per row (teacher ids,
        pair_student, pair_teacher, student_chunk, teacher_chunk), int64 numpy as ``spans.pairs_and_chunks`` gives
        them; ``width`` is the student batch's."""
        return self._pad(rows, width)

    def _pad(self, rows: list[tuple], width: int) -> dict[str, torch.Tensor]:
        size = len(rows)
        t_width = max((row[0].size for row in rows), default=0)
        pairs = max((row[1].size for row in rows), default=0)
        teacher = np.full((size, t_width), self.teacher_pad, np.int64)
        mask = np.zeros((size, t_width), np.int64)
        b_s, b_t = np.full((size, pairs), -1, np.int64), np.full((size, pairs), -1, np.int64)
        s_chunk, t_chunk = np.full((size, width), -1, np.int64), np.full((size, t_width), -1, np.int64)
        for b, (t_ids, p_s, p_t, c_s, c_t) in enumerate(rows):
            teacher[b, : t_ids.size], mask[b, : t_ids.size] = t_ids, 1
            b_s[b, : p_s.size], b_t[b, : p_t.size] = p_s, p_t
            s_chunk[b, : c_s.size], t_chunk[b, : c_t.size] = c_s, c_t
        out = {
            "teacher_input_ids": teacher, "teacher_attention_mask": mask, "boundary_student": b_s,
            "boundary_teacher": b_t, "student_chunk": s_chunk, "teacher_chunk": t_chunk,
        }  # fmt: skip
        return {k: torch.from_numpy(v) for k, v in out.items()}


def _real_groups(alignment, skipped: int) -> np.ndarray:
    """The groups to keep: with skipped bytes, one that closes at byte 0 is made of nothing but them (a dummy
    prefix, the rest of a cut character): its tokens join the next group instead of pairing up."""
    return (alignment.group_end > 0) | (skipped == 0)


def _space_skips(student: bytes, teacher: bytes) -> tuple[int, int]:
    """A leading space one side has and the other not (a SentencePiece prefix inside a rendering): skip it."""
    if student[:1] == b" " and teacher[:1] != b" " and student[1:2] == teacher[:1]:
        return 1, 0
    if teacher[:1] == b" " and student[:1] != b" " and teacher[1:2] == student[:1]:
        return 0, 1
    return 0, 0
