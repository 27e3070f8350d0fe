"""Errors of ``lit-distill`` stated in one message: what a configuration did wrong, without a traceback.

jsonargparse reports a value that fits no member of a Union as a nested tree of every alternative it tried, and
wraps whatever a class raised while being built; a user needs the option and the reason. These functions only
read messages and exceptions (no parser, no Lightning CLI), so the parser and the CLI class both use them.
"""

from __future__ import annotations

import os
import re
import textwrap

# Errors of a configuration (a value, a missing file or model) rather than of the program.
CONFIG_ERRORS = (ValueError, OSError, ImportError)


def debug_requested() -> bool:
    """Whether ``JSONARGPARSE_DEBUG`` asks for tracebacks instead of one-line errors."""
    return os.environ.get("JSONARGPARSE_DEBUG", "").lower() not in ("", "0", "false", "no")


# Reasons jsonargparse gives for the alternatives a value was not meant as: the None of an optional argument,
# the torch.nn.Module of a model argument, a config file for a class argument, a Union without its members.
NOT_MEANT = re.compile(
    r"Expected a <class 'NoneType'>|Expected a NoneType|does not correspond to a subclass of|^Expected a path but"
    r"|^Does not validate against any of the Union subtypes$"
)


def configuration_error(err: BaseException) -> str | None:
    """The message of an error that a configuration caused, or None for anything else (a bug, which keeps its
    traceback).

    jsonargparse wraps what went wrong while building the classes; the first exception in ``err``'s ``__cause__``
    chain raised outside jsonargparse is the one to show, if it is one of ``CONFIG_ERRORS`` or Lightning's
    ``MisconfigurationException``. When jsonargparse itself refused a value, its messages are made concise, and
    the first that names a reason (not only a refused alternative) is shown.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    chain: list[BaseException] = []
    while err is not None and all(err is not seen for seen in chain):
        chain.append(err)
        err = err.__cause__
    own = next((e for e in chain if not _raised_in_jsonargparse(e)), None)
    if own is not None:
        return str(own) if isinstance(own, (*CONFIG_ERRORS, MisconfigurationException)) else None
    messages = [concise_error(str(e)) for e in chain]
    return next((m for m in messages if not NOT_MEANT.search(m) and "Union subtypes" not in m), messages[0])


def _raised_in_jsonargparse(err: BaseException) -> bool:
    return _raised_in(err, "jsonargparse")


def _raised_in(err: BaseException, package: str) -> bool:
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}{package}{os.sep}" in tb.tb_frame.f_code.co_filename


def run_error(err: BaseException) -> tuple[str, int] | None:
    """(message, exit status) of an error that lit-distill itself raised while running a command (a damaged
    checkpoint, another tokenizer's checkpoint, a NaN loss), or None for anything else (which keeps its
    traceback). Bad input gives status 2, as a bad option does; a NaN or infinite loss 1, as a failed run."""
    if not _raised_in(err, "lit_distill"):
        return None
    if isinstance(err, FloatingPointError):
        return str(err), 1
    if isinstance(err, (ValueError, OSError)):
        return str(err), 2
    return None


def concise_error(message: str) -> str:
    """jsonargparse's error ``message`` as one statement: the full option and what is wrong with its value.

    jsonargparse nests the reasons a value fails every member of a Union (``Parser key "model": Does not
    validate against any of the Union subtypes ... - Problem with given class_path ... Parser key "loss": ...``);
    this follows the nesting to the innermost reason, skipping the alternatives the value was not meant as
    (``NOT_MEANT``). A message of another shape is returned as it is.
    """
    try:
        path, reason = _innermost(textwrap.dedent(message).strip().splitlines(), [])
    except Exception:  # another shape than expected: the message as it is
        return message.strip()
    reason = re.sub(r"<class '([\w.]+)'>", r"\1", " ".join(line.strip() for line in reason))
    if not path:
        return reason
    option = "--" + ".".join(path)
    unknown = re.match(r"Option '([^']+)' is not accepted", reason)
    if unknown and path[-1] == "init_args":
        return f"{option}.{unknown.group(1)}: no such option{_of_class(message, path)}"
    return f"{option}: {reason}"


def _of_class(message: str, path: list[str]) -> str:
    classes = re.findall(r"Problem with given class_path '([^']+)'", message)
    return f" of {classes[len([p for p in path if p == 'init_args']) - 1]}" if classes else ""


def _innermost(lines: list[str], path: list[str]) -> tuple[list[str], list[str]]:
    lines = [line for line in lines if line.strip()]
    first = lines[0].strip()
    key = re.fullmatch(r'Parser key "([^"]+)":\s*(.*)', first)
    if key:
        rest = ([key.group(2)] if key.group(2) else []) + textwrap.dedent("\n".join(lines[1:])).splitlines()
        return _innermost(rest, [*path, *key.group(1).split(".")])
    class_path = re.fullmatch(r"Problem with given class_path '([^']+)':\s*(.*)", first)
    if class_path:
        rest = ([class_path.group(2)] if class_path.group(2) else []) + textwrap.dedent(
            "\n".join(lines[1:])
        ).splitlines()
        if not rest[0].strip().startswith(("Parser key", "Option '", "Does not validate", "- ")):
            return path, [f"{class_path.group(1)}: {' '.join(line.strip() for line in rest)}"]  # the class itself
        return _innermost(rest, [*path, "init_args"])
    if first.startswith("- "):  # the alternatives tried for one value; a Union's details follow at this indent
        union = next((i for i, line in enumerate(lines) if line.strip().startswith("- Does not validate")), None)
        if union is not None:
            return _innermost([lines[union].strip()[2:], *lines[union + 1 :]], path)
        return _innermost(_pick(_items(lines, 0)), path)
    if first.startswith("Does not validate against any of the Union subtypes"):
        start = next(i for i, line in enumerate(lines) if line.strip() == "Errors:") + 1
        return _innermost(_pick(_items(lines, start)), path)
    return path, lines


def _pick(items: list[list[str]]) -> list[str]:
    return next((item for item in items if not NOT_MEANT.search(item[0])), items[0])


def _items(lines: list[str], start: int) -> list[list[str]]:
    """The items of a ``- ...`` list starting at ``lines[start]``, each as its lines (continuations dedented)."""
    indent = len(lines[start]) - len(lines[start].lstrip())  # of the "- " that starts each item
    items: list[list[str]] = []
    for line in lines[start:]:
        if line[indent:].startswith("- ") and not line[:indent].strip():
            items.append([line[indent + 2 :]])
        elif items and len(line) - len(line.lstrip()) > indent:
            items[-1].append(line)
        else:
            break
    return [[item[0], *textwrap.dedent("\n".join(item[1:])).splitlines()] for item in items]
