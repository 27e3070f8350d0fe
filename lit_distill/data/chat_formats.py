"""The formats of chat data, detected from a dataset's columns, and each row normalized to role/content messages.

- ``messages``: a list of ``{"role", "content"}`` messages, taken as they are;
- ``conversations``: ShareGPT's ``{"from", "value"}``; human/gpt/system become user/assistant/system;
- ``prompt`` + ``completion``: strings or message lists; a string prompt is one user turn, a string completion
  one assistant turn;
- ``text``: a string; plain language modeling, every token counted.

A dataset with several of these columns is read in the order of this list. The data comes from a file, a
``save_to_disk`` directory or the Hub (:func:`load_source`, through ``datasets``, imported there only). Nothing
here tokenizes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

#: format name -> the columns it needs; detection tries them in this order
FORMATS = {
    "messages": ("messages",),
    "conversations": ("conversations",),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}
ACCEPTED = (
    "'messages' (a list of role/content messages), 'conversations' (ShareGPT: from/value), 'prompt' + 'completion'"
    " (strings or message lists) or 'text' (plain text, every token counted)"
)
#: data file suffixes (after a compression suffix) and the ``datasets`` builder that reads them
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst")
ROLES = ("system", "user", "assistant", "tool")
PLAIN_ROLES = {role: role for role in ROLES}
#: ShareGPT's speaker names (and the roles themselves, which some ShareGPT exports already use)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", **PLAIN_ROLES}


class Conversation(NamedTuple):
    """One row, normalized.

    Attributes:
        messages: role/content dicts (other keys a message has, such as ``tool_calls``, kept); None for text.
        text: the row's text for the ``text`` format, else None.
        prompt_turns: for prompt/completion rows, how many of ``messages`` are the prompt; else 0.
    """

    messages: list[dict[str, Any]] | None
    text: str | None = None
    prompt_turns: int = 0


def load_source(source: str, split: str = "train", cache_dir: str | Path | None = None):
    """A ``datasets.Dataset`` from a data file (jsonl/json/parquet/csv/arrow), a directory written by
    ``save_to_disk`` (or holding data files), or a Hugging Face Hub name with ``split``.

    Raises:
        FileNotFoundError: a local-looking path that does not exist.
        ValueError: a file of another kind; a saved dataset without ``split``.
        ConnectionError: a Hub name that cannot be reached; says when the Hub is offline.
    """
    import datasets

    cache = str(cache_dir) if cache_dir is not None else None
    path = Path(source).expanduser()
    suffix = path.with_suffix("").suffix if path.suffix in _COMPRESSION else path.suffix
    if path.is_dir():
        if any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"{source} holds the splits {sorted(loaded)}, not split={split!r}")
                loaded = loaded[split]
            return loaded
        return datasets.load_dataset(str(path), split=split, cache_dir=cache)
    if path.is_file():
        if suffix not in BUILDERS:
            raise ValueError(f"{source}: chat data files end in {', '.join(BUILDERS)} (optionally compressed)")
        return datasets.load_dataset(BUILDERS[suffix], data_files=str(path), split="train", cache_dir=cache)
    if suffix in BUILDERS or source.startswith((".", "/", "~")):
        raise FileNotFoundError(f"chat data file {source} does not exist")
    try:
        return datasets.load_dataset(source, split=split, cache_dir=cache)
    except ConnectionError as err:
        if datasets.config.HF_HUB_OFFLINE:
            raise ConnectionError(
                f"{source!r} is not a local file or directory, and the Hugging Face Hub is offline (HF_HUB_OFFLINE"
                " is set) with no copy of it in the cache: point train/val at a local file (jsonl, parquet, ...) or"
                " a directory written by save_to_disk"
            ) from err
        raise ConnectionError(
            f"could not reach the Hugging Face Hub for the dataset {source!r} ({err}); on a machine without a"
            " network, point train/val at a local file or a save_to_disk directory"
        ) from err


def detect_format(columns: Iterable[str], where: str) -> str:
    """The format (a key of :data:`FORMATS`) of a dataset with these ``columns``.

    Raises:
        ValueError: naming the fields found and the formats accepted.
    """
    columns = list(columns)
    for name, needed in FORMATS.items():
        if all(column in columns for column in needed):
            return name
    hint = " ('prompt' without 'completion' is a prompt set, not training data)" if "prompt" in columns else ""
    raise ValueError(
        f"{where} is in no chat data format I know: found the fields {sorted(columns)}{hint}; accepted: {ACCEPTED}"
    )


def normalize(row: dict[str, Any], fmt: str, index: int, where: str) -> Conversation:
    """Row ``index`` of ``where`` (a dataset in format ``fmt``) as a :class:`Conversation`.

    Raises:
        ValueError: a role other than system/user/assistant/tool (or ShareGPT's human/gpt), a message without
            text content, an empty conversation; each names the row.
    """
    if fmt == "text":
        if not isinstance(row["text"], str):
            raise ValueError(f"row {index} of {where}: 'text' is {type(row['text']).__name__}, not a string")
        return Conversation(None, text=row["text"])
    if fmt == "messages":
        messages = _messages(row["messages"], "role", "content", PLAIN_ROLES, index, where)
    elif fmt == "conversations":
        messages = _messages(row["conversations"], "from", "value", SHAREGPT_ROLES, index, where)
    else:
        prompt = _side(row["prompt"], "user", index, where)
        completion = _side(row["completion"], "assistant", index, where)
        messages = prompt + completion
        if not completion:
            raise ValueError(f"row {index} of {where} has an empty completion")
        return Conversation(messages, prompt_turns=len(prompt))
    if not messages:
        raise ValueError(f"row {index} of {where} has no messages")
    return Conversation(messages)


def _side(value: Any, role: str, index: int, where: str) -> list[dict[str, Any]]:
    """A prompt or a completion: a string is one ``role`` turn, a list holds messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return _messages(value, "role", "content", PLAIN_ROLES, index, where)


def _messages(
    turns: Any, role_key: str, content_key: str, roles: dict[str, str], index: int, where: str
) -> list[dict[str, Any]]:
    if not isinstance(turns, (list, tuple)):
        raise ValueError(f"row {index} of {where}: expected a list of messages, got {type(turns).__name__}")
    messages = []
    for turn, message in enumerate(turns):
        if not isinstance(message, dict) or role_key not in message:
            raise ValueError(f"row {index} of {where}: message {turn} has no {role_key!r} field")
        name = message[role_key]
        if name not in roles:
            accepted = ", ".join(repr(r) for r in roles)
            raise ValueError(
                f"row {index} of {where}: message {turn} has the role {name!r}; the roles accepted are {accepted}"
            )
        content = message.get(content_key)
        if not isinstance(content, str):
            raise ValueError(
                f"row {index} of {where}: message {turn} has no text {content_key!r} (got {type(content).__name__})"
            )
        # Arrow gives every message every key any message has (None where absent): keep only the real ones.
        extra = {k: v for k, v in message.items() if k not in (role_key, content_key) and v is not None}
        messages.append({**extra, "role": roles[name], "content": content})
    return messages
