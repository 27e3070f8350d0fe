"""Each token's UTF-8 bytes, read from the tokenizer's own vocabulary (never by re-encoding text).

Two schemes are recovered, detected from ``tokenizer.backend_tokenizer.to_str()`` rather than from names:

- ByteLevel (GPT-2, Llama-3, Qwen): every character of a piece stands for one byte through GPT-2's
  bytes-to-unicode table, inverted here.
- Metaspace / SentencePiece with byte fallback (Llama-2, Gemma, Mistral): ``▁`` is a space, ``<0xNN>`` is the
  single byte NN, every other piece is its own UTF-8.

Special tokens (``all_special_ids``, added tokens with ``special=True``) are zero-width ``b""``: they stand for
no text. Added tokens that are not special stand for their content's UTF-8 (they match raw text).
Anything else (WordPiece's ``##``, a BPE that can emit ``<unk>`` for unseen characters) raises ``ValueError``.

The SentencePiece dummy prefix: a Metaspace tokenizer (``prepend_scheme`` "first"/"always", legacy
``add_prefix_space``, or a ``Prepend("▁")`` normalizer) puts a ``▁`` before the first word, so the token bytes of
``"Hello"`` are ``b" Hello"``. The table keeps that space (the piece does mean a space); a caller that aligns the
same text on two tokenizers asks :func:`added_prefix` how many leading bytes the tokenizer added (0 or 1) and
passes it to ``align(..., student_skip=, teacher_skip=)``, which drops those bytes before the walk.
"""

from __future__ import annotations

import contextlib
import json
import re
import weakref
from collections.abc import Iterable, Sequence

import numpy as np

SPACE_PIECE = "\u2581"  # ▁, SentencePiece's space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
#: tokenizer -> (len(tokenizer), table, lengths); weak so that a dead tokenizer frees its table, and checked
#: against len() so that add_tokens after the first call is seen
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes stand for themselves, the other 68
    (control characters, space, 0x7F-0xA0, 0xAD) are moved to U+0100 onwards, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, moved = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + moved)
            moved += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def _components(node) -> Iterable[dict]:
    """A pre-tokenizer / normalizer / decoder and, for a Sequence, its members (nested)."""
    if not isinstance(node, dict):
        return
    yield node
    for key in ("pretokenizers", "normalizers", "decoders"):
        for child in node.get(key) or ():
            yield from _components(child)


def _scheme(tokenizer) -> tuple[str, bool]:
    """("bytelevel" | "metaspace", byte_fallback) for a tokenizer whose bytes can be recovered, else ValueError."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {_name(tokenizer)!r} has no fast backend: its token bytes cannot be read")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    parts = [c for key in ("normalizer", "pre_tokenizer", "decoder") for c in _components(spec.get(key))]
    types = {c.get("type") for c in parts}
    if model.get("type") == "WordPiece" or "WordPiece" in types:
        raise ValueError(
            f"tokenizer {_name(tokenizer)!r} is WordPiece: '##' continuation pieces drop the spaces between words,"
            " so its token bytes cannot be recovered"
        )
    if "ByteLevel" in types:
        return "bytelevel", False
    byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in types
    spaces = "Metaspace" in types or any(
        c.get("type") == "Replace" and SPACE_PIECE in json.dumps(c, ensure_ascii=False) for c in parts
    )
    if spaces and byte_fallback:
        return "metaspace", True
    why = "without byte fallback, unseen characters become <unk>" if spaces else "no ByteLevel or ▁ space scheme"
    raise ValueError(
        f"tokenizer {_name(tokenizer)!r} ({model.get('type')} model): its token bytes cannot be recovered ({why})"
    )


def _piece_bytes(piece: str, scheme: str, byte_fallback: bool, tokenizer, token_id: int) -> bytes:
    if scheme == "bytelevel":
        try:
            return bytes(_UNICODE_TO_BYTE[c] for c in piece)
        except KeyError as err:
            raise ValueError(
                f"tokenizer {_name(tokenizer)!r}: token {token_id} {piece!r} has a character outside the"
                f" ByteLevel alphabet ({err.args[0]!r})"
            ) from None
    if byte_fallback and (match := _BYTE_PIECE.fullmatch(piece)):
        return bytes([int(match.group(1), 16)])
    return piece.replace(SPACE_PIECE, " ").encode("utf-8")


def _build(tokenizer) -> list[bytes]:
    scheme, byte_fallback = _scheme(tokenizer)
    backend = tokenizer.backend_tokenizer
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items()}
    special = set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
    table = []
    for i in range(len(tokenizer)):
        if i in special:
            table.append(b"")
        elif i in added:  # matched on raw text before pre-tokenization: the content is the text itself
            table.append(added[i].content.encode("utf-8"))
        else:
            piece = backend.id_to_token(i)
            table.append(b"" if piece is None else _piece_bytes(piece, scheme, byte_fallback, tokenizer, i))
    return table


def _cached(tokenizer) -> tuple[list[bytes], np.ndarray]:
    size = len(tokenizer)
    try:
        hit = _CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable: no cache
        hit = None
    if hit is not None and hit[0] == size:
        return hit[1], hit[2]
    table = _build(tokenizer)
    lengths = np.fromiter(map(len, table), dtype=np.int64, count=len(table))
    lengths.setflags(write=False)
    with contextlib.suppress(TypeError):  # not weak-referenceable: no cache
        _CACHE[tokenizer] = (size, table, lengths)
    return table, lengths


def token_bytes(tokenizer) -> list[bytes]:
    """The UTF-8 bytes of every token id ``0 .. len(tokenizer) - 1`` (specials ``b""``).

    Cached per tokenizer object and process (collators call this per batch; a DataLoader worker builds its own
    once): the returned list is shared, do not modify it.

    Raises:
        ValueError: naming the tokenizer, when its bytes cannot be recovered (WordPiece, a BPE that can emit unk).
    """
    return _cached(tokenizer)[0]


def byte_lengths(tokenizer) -> np.ndarray:
    """``int64 [len(tokenizer)]``: the number of UTF-8 bytes each token stands for (read-only, cached)."""
    return _cached(tokenizer)[1]


def text_bytes_of(ids: Iterable[int], table: Sequence[bytes]) -> bytes:
    """The bytes a list of ids stands for (specials contribute nothing; a dummy prefix space is kept)."""
    return b"".join(table[int(i)] for i in ids)


def added_prefix(ids: Iterable[int], table: Sequence[bytes], text: str | bytes) -> int:
    """How many leading bytes of ``ids``' bytes the tokenizer added in front of ``text``: 1 when they are
    ``b" " + text`` (SentencePiece's dummy prefix; ``text`` may be cut short by truncation), else 0.

    Pass the result as ``student_skip`` / ``teacher_skip`` to :func:`~.align.align`.
    """
    got = text_bytes_of(ids, table)
    want = text.encode("utf-8") if isinstance(text, str) else text
    if got == want[: len(got)]:
        return 0
    return 1 if got[:1] == b" " and got[1:] == want[: len(got) - 1] else 0
