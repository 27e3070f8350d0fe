"""Conversations from the bundled plays, a chat data set that needs no download.

A play is parsed into scenes of speeches: a speech starts at a speaker heading, a line of its own after a blank
line and right before the speech's first line (``HAMLET.``, ``Ham.``, ``Lady Capulet.``, ``THESEUS``), and runs
to the next heading or act/scene line; stage directions (``[Exit.]``, ``[Aside.] ...``, lines opening with
``Enter``/``Exit``/``Exeunt``) are left out. Nothing before a work's first act, scene, prologue or induction line
is read (the list of persons), so the poems give nothing.

Each speech after the first of a scene (and not by the same speaker as the one before it) becomes a
conversation: a system line naming the speaker and the play, the preceding speeches of the scene with their
speakers' names as the user turn, and the speech as the assistant turn.

    python -m lit_distill.data.dialogues artifacts/dialogues     # writes train.jsonl and val.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from collections.abc import Sequence
from pathlib import Path

from .corpus import read_documents, split_documents

_SECTION = re.compile(
    r"(?:ACT|SCENE|Act|Scene)(?:\s+(?:[IVXLC\d]+|[A-Z]+)\b|[.:]|$)"
    r"|(?:PROLOGUE|EPILOGUE|INDUCTION|Prologue|Epilogue|Induction)\.?$"
)
_NAME = re.compile(r"[A-Z0-9][\w'&-]*(?:[ ,]+(?:[A-Z0-9][\w'&-]*|of|the|and|de|la|du|le))*\.?")
_DIRECTION = re.compile(r"\[[^\]}]*(?:[\]}]|$)")  # [Exit.], [Aside.], one spanning lines, an unclosed one
_DIRECTION_LINE = re.compile(r"(?:Enter|Exit|Exeunt|Re-enter)\b")
_SMALL_WORDS = {"of", "the", "and", "or", "in", "a", "an", "to", "for", "as"}


def is_heading(line: str) -> bool:
    """Whether ``line`` has the form of a speaker heading (its place, after a blank line and before a speech
    line, is checked by :func:`parse_scenes`)."""
    if not line or line[0].isspace() or len(line) > 40 or len(line.split()) > 5 or _SECTION.match(line):
        return False
    name = line.rstrip(".")
    if not _NAME.fullmatch(line) or re.fullmatch(r"[IVXLC\d]+", name):
        return False
    return line.endswith(".") or not any(c.islower() for c in line)  # mixed case needs the period


def parse_scenes(work: str) -> list[list[tuple[str, str]]]:
    """The scenes of a play, each a list of ``(speaker, speech)``: the speaker as the heading writes it without
    its final period, the speech's lines stripped and joined by newlines, stage directions left out."""
    lines = [line.rstrip() for line in work.splitlines()]
    section = [bool(_SECTION.match(line)) for line in lines]
    start = next((i for i, is_section in enumerate(section) if is_section), len(lines))
    scenes: list[list[tuple[str, str]]] = [[]]
    speaker, body = None, []

    def close() -> None:
        text = "\n".join(body)
        text = _DIRECTION.sub("", text)
        kept = [s.strip() for s in text.splitlines()]
        kept = [s for s in kept if s and not _DIRECTION_LINE.match(s)]
        if speaker is not None and kept:
            scenes[-1].append((speaker, "\n".join(kept)))

    for i in range(start, len(lines)):
        line = lines[i]
        if section[i] and (i == start or not lines[i - 1].strip() or section[i - 1]):
            close()
            speaker, body = None, []
            if scenes[-1]:
                scenes.append([])
        elif is_heading(line) and not lines[i - 1].strip() and i + 1 < len(lines) and lines[i + 1].strip():
            close()
            speaker, body = line.rstrip("."), []
        elif speaker is not None:
            body.append(line)
    close()
    return [scene for scene in scenes if scene]


def play_title(work: str) -> str:
    """The work's title (the line before its byline, without text glued from the previous work), title-cased."""
    lines = work.splitlines()
    at = next((i for i, line in enumerate(lines) if line.startswith("by William Shakespeare")), 1)
    head = next((line.strip() for line in reversed(lines[:at]) if line.strip()), "")
    found = re.search(r"[A-Z][A-Z0-9 ,;:'&-]*$", head)
    words = (found.group(0) if found else head).split()
    out = []
    for k, word in enumerate(words):
        bare = word.strip(",;:")
        if re.fullmatch(r"[IVX]+", bare):
            out.append(word)
        elif k and bare.lower() in _SMALL_WORDS:
            out.append(word.lower())
        else:
            out.append(word.capitalize())
    return " ".join(out)


def _clip(text: str, max_chars: int, keep_end: bool = False) -> str:
    """``text`` cut to at most ``max_chars`` characters at line breaks (or spaces, for one long line), keeping its
    start (or, with ``keep_end``, its end)."""
    if len(text) <= max_chars:
        return text
    lines = text.splitlines()[:: -1 if keep_end else 1]
    kept, size = [], -1  # the characters of the kept lines joined by newlines
    for line in lines:
        if size + 1 + len(line) > max_chars:
            break
        kept.append(line)
        size += 1 + len(line)
    if not kept:  # one line longer than max_chars: cut it at a space
        line = lines[0]
        cut = line[-max_chars:] if keep_end else line[:max_chars]
        parts = cut.split(" ")
        return " ".join(parts[1:] if keep_end else parts[:-1]) or cut
    return "\n".join(kept[:: -1 if keep_end else 1])


def play_conversations(
    works: Sequence[str], context_speeches: int = 2, max_chars: int = 400
) -> list[dict[str, list[dict[str, str]]]]:
    """Conversations (``{"messages": [system, user, assistant]}``) from the speeches of ``works``.

    Args:
        works: the works' texts (``read_documents()`` gives the bundled ones); poems give none.
        context_speeches: the preceding speeches of the scene in the user turn, at most.
        max_chars: the user turn and the reply each hold at most this many characters (whole lines where they
            can): the most recent speeches, and a speech's end, stay in the user turn; a reply keeps its start.
    """
    if context_speeches < 1 or max_chars < 1:
        raise ValueError(f"need context_speeches >= 1 and max_chars >= 1; got {context_speeches}, {max_chars}")
    conversations = []
    for work in works:
        title = play_title(work)
        for scene in parse_scenes(work):
            for k in range(1, len(scene)):
                speaker, speech = scene[k]
                if scene[k - 1][0] == speaker:  # the same speaker, after a stage direction
                    continue
                turns: list[str] = []
                for name, text in reversed(scene[max(0, k - context_speeches) : k]):
                    turn = f"{name}: {text}"
                    if turns and len(turn) + 2 + len("\n\n".join(turns)) > max_chars:
                        break
                    turns.insert(0, f"{name}: {_clip(text, max(1, max_chars - len(name) - 2), keep_end=True)}")
                messages = [
                    {"role": "system", "content": f"You are {speaker} in {title}."},
                    {"role": "user", "content": "\n\n".join(turns)},
                    {"role": "assistant", "content": _clip(speech, max_chars)},
                ]
                conversations.append({"messages": messages})
    return conversations


def write_dialogues(
    directory: str | os.PathLike, val_works: int = 2, seed: int = 0, context_speeches: int = 2, max_chars: int = 400
) -> dict[str, int]:
    """Write ``train.jsonl`` and ``val.jsonl`` of :func:`play_conversations` from the bundled works into
    ``directory``, split by whole works as ``TextDataModule`` splits them (``val_works=2``: the same held-out
    works as its default validation); rows shuffled with ``seed``. Returns the number of conversations of each.
    """
    works = read_documents()
    if not 0 < val_works < len(works):
        raise ValueError(f"val_works must lie in [1, {len(works) - 1}], got {val_works}")
    splits = dict(zip(("train", "val"), split_documents(works, val_works / len(works)), strict=True))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, part in splits.items():
        rows = play_conversations(part, context_speeches, max_chars)
        random.Random(seed).shuffle(rows)
        path = directory / f"{name}.jsonl"
        partial = path.with_name(path.name + ".partial")
        with open(partial, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        os.replace(partial, path)  # whole or not there
        counts[name] = len(rows)
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(
        prog="python -m lit_distill.data.dialogues",
        description="Write train.jsonl and val.jsonl of conversations from the bundled plays.",
    )
    parser.add_argument("directory", help="where to write them (e.g. artifacts/dialogues)")
    parser.add_argument("--val-works", type=int, default=2, help="whole works held out for validation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the rows' order")
    parser.add_argument("--context-speeches", type=int, default=2, help="preceding speeches in the user turn")
    parser.add_argument("--max-chars", type=int, default=400, help="characters of the user turn and reply, at most")
    args = parser.parse_args(argv)
    counts = write_dialogues(args.directory, args.val_works, args.seed, args.context_speeches, args.max_chars)
    print(f"{args.directory}: {counts['train']:,} training and {counts['val']:,} validation conversations")
    return counts


if __name__ == "__main__":
    main()
