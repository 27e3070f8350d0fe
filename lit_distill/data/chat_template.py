"""Conversations to token ids and the tokens that count, through the tokenizer's own chat template.

A conversation is rendered to text by its template, then tokenized once with ``add_special_tokens=False``: the
template writes the special tokens it wants (BOS among them), so BOS is never doubled. The assistant turns come
from the template's ``{% generation %}`` markers when it has them (transformers' assistant-token mask), else
from rendering growing prefixes: ``messages[:i]`` with the generation prompt, then ``messages[:i + 1]``; the
first must be a prefix of the second, and the text between them is assistant turn ``i``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .chat_formats import Conversation

LOSS_ON = ("assistant", "last_assistant", "completion", "all")
#: the template ``chat_template="bundled"`` names: plain-text role headers, each turn ending with the tokenizer's EOS
BUNDLED_CHAT_TEMPLATE = Path(__file__).parents[1] / "assets" / "chat_template.jinja"
_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def resolve_template(tokenizer, chat_template: str | None) -> str:
    """The Jinja template to render with: the file ``chat_template`` names (a string holding Jinja tags is the
    template itself; ``"bundled"`` is :data:`BUNDLED_CHAT_TEMPLATE`), else the tokenizer's own.

    Raises:
        FileNotFoundError: ``chat_template`` is neither a file nor a template.
        ValueError: no ``chat_template`` given and the tokenizer has none.
    """
    if chat_template is not None:
        if "{{" in chat_template or "{%" in chat_template:
            return chat_template
        path = BUNDLED_CHAT_TEMPLATE if chat_template == "bundled" else Path(chat_template).expanduser()
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise FileNotFoundError(f"chat_template {chat_template!r} is not a file (nor a Jinja template, nor 'bundled')")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(
            f"the tokenizer {name} has no chat template and no chat_template was given: pass chat_template= a"
            " Jinja file (the template of the chat model the teacher was tuned as), or use 'text' data"
        )
    return template


def has_generation_markers(template: str) -> bool:
    """Whether the template marks assistant text with ``{% generation %}`` ... ``{% endgeneration %}``."""
    return bool(_MARKER.search(template))


def encode(tokenizer, template: str, conversation: Conversation, loss_on: str, index: int, where: str):
    """``(ids, counted, merged)``: the token ids, a bool per token (learned or not), and how many turn
    boundaries a BPE merge crossed (see :func:`_boundary`).

    Raises:
        ValueError: no assistant turn to count; a template that does not render growing prefixes.
    """
    if conversation.messages is None:  # plain text: the tokenizer's own special tokens, then EOS; all counted
        ids = list(tokenizer(conversation.text)["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        return ids, [True] * len(ids), 0
    messages = conversation.messages
    if loss_on == "all":
        ids = _tokenize(tokenizer, _render(tokenizer, template, messages, False))
        return ids, [True] * len(ids), 0
    if loss_on == "completion":
        if not conversation.prompt_turns:
            raise ValueError(
                f"loss_on='completion' needs prompt/completion data; row {index} of {where} is a conversation:"
                " use loss_on='assistant' or 'last_assistant'"
            )
        turns = [conversation.prompt_turns]  # one span: from the end of the prompt to the end
    else:
        turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
        if not turns:
            raise ValueError(
                f"conversation {index} of {where} has no assistant turn, so loss_on={loss_on!r} counts none of"
                " its tokens; drop it, or use loss_on='all'"
            )
        if loss_on == "last_assistant":
            turns = turns[-1:]
    if loss_on != "completion" and has_generation_markers(template):
        ids, spans = _marked_spans(tokenizer, template, messages)
        spans = spans[-1:] if loss_on == "last_assistant" else spans
        merged = 0
    else:
        ids, spans, merged = _prefix_spans(tokenizer, template, messages, turns, loss_on == "completion", index, where)
    counted = [False] * len(ids)
    for start, end in spans:
        counted[start:end] = [True] * (end - start)
    return ids, counted, merged


def _render(tokenizer, template: str, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
    )


def _tokenize(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _marked_spans(tokenizer, template: str, messages: list[dict[str, Any]]):
    """Token ids and the ``[start, end)`` token runs inside the template's generation markers (one per turn: a
    template puts at least a header between two assistant turns)."""
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    spans, start = [], None
    for position, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = position
        elif not bit and start is not None:
            spans.append((start, position))
            start = None
    return ids, spans


def _prefix_spans(tokenizer, template, messages, turns, completion: bool, index: int, where: str):
    """Token ids of the whole conversation and the ``[start, end)`` token span of each turn in ``turns``, from
    renders of growing prefixes; with ``completion``, one span from the end of the prompt to the end."""
    full = _render(tokenizer, template, messages, False)
    texts = [full]  # the conversation, then each turn's text before and after it (tokenized in one call)
    for turn in turns:
        answer = messages[turn]["role"] == "assistant"  # the generation prompt opens an assistant turn
        before = _render(tokenizer, template, messages[:turn], answer)
        last = completion or turn == len(messages) - 1
        after = full if last else _render(tokenizer, template, messages[: turn + 1], False)
        if not (after.startswith(before) and full.startswith(after)):
            raise ValueError(
                f"conversation {index} of {where}: the chat template does not render growing prefixes (messages"
                f"[:{turn}] with the generation prompt is not the start of messages[:{turn + 1}]), so its assistant"
                " turns cannot be found; mark them with {% generation %} ... {% endgeneration %} in the template,"
                " or use loss_on='all'"
            )
        texts += [before, after]
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"][0]), encoded["offset_mapping"][0]
    spans, merged = [], 0
    for k in range(len(turns)):
        start, merged_start = _boundary(ids, offsets, encoded["input_ids"][1 + 2 * k], len(texts[1 + 2 * k]), "start")
        end, merged_end = _boundary(ids, offsets, encoded["input_ids"][2 + 2 * k], len(texts[2 + 2 * k]), "end")
        spans.append((start, end))
        merged += merged_start + merged_end
    return ids, spans, merged


def _boundary(ids: list[int], offsets, alone: list[int], cut: int, side: str) -> tuple[int, int]:
    """``(the token index in ``ids`` where a prefix of ``cut`` characters ends, 1 if a BPE merge crossed that
    point else 0)``, for the ``side`` (``"start"`` or ``"end"``) of a span; ``alone`` is the prefix tokenized alone.

    The boundary is found on token ids: when ``alone`` is a prefix of ``ids``, the prefix ends there. That fails
    when a BPE merge joins the prefix's last characters to the next ones (a generation prompt ending in a space,
    say: ``"Assistant: "`` + ``"Hi"`` is tokenized ``"Assistant", ":", " Hi"``). The row keeps the whole
    conversation tokenized once (what a model reads), and the token across the boundary goes into the span, on
    either side, by its character offsets: the rule of the ``{% generation %}`` path (a token touching a span is
    in it), so both paths give the same spans. The data module counts these boundaries in its summary.
    """
    if ids[: len(alone)] == list(alone):
        return len(alone), 0
    if side == "start":  # the first token ending after the cut
        return next((i for i, (_, stop) in enumerate(offsets) if stop > cut), len(ids)), 1
    return next((i for i, (begin, _) in enumerate(offsets) if begin >= cut), len(ids)), 1


def end_of_turn_ids(tokenizer, template: str) -> list[int]:
    """The special token the template writes right after an assistant's text (``<|eot_id|>``, ``<|im_end|>``,
    ...), as a one-element list; empty when it writes none (plain text, or nothing)."""
    mark = "ENDOFTURNPROBE"
    try:
        text = _render(
            tokenizer, template, [{"role": "user", "content": "x"}, {"role": "assistant", "content": mark}], False
        )
    except Exception:  # a template that refuses this conversation: nothing to learn from it
        return []
    after = text.split(mark, 1)[1] if mark in text else ""
    ids = _tokenize(tokenizer, after) if after else []
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special} | set(
        tokenizer.all_special_ids
    )
    return ids[:1] if ids and ids[0] in special else []


def stop_ids(tokenizer, chat_template: str | None) -> list[int]:
    """Where a reply ends: the tokenizer's EOS and the template's end-of-turn token (the ``stop_token_ids`` of
    ``ChatDataModule`` and ``PromptDataModule``, for ``OnPolicyDistillation``)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    template = resolve_template(tokenizer, chat_template)
    return list(dict.fromkeys(ids + end_of_turn_ids(tokenizer, template)))
