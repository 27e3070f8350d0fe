"""The text to distill on: the bundled corpus or local files, as documents, split by whole documents.

The bundled corpus is the 42 plays and poems of Shakespeare (Project Gutenberg texts as shipped in the
``shakespeare`` 0.6 package; credit: Open Knowledge Foundation, shakespeare package 0.6, CC BY 2.5), so
that nothing is downloaded. Validation holds out whole documents (whole works for the bundled corpus), so
no validation text is ever seen in training.
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

BUNDLED_CORPUS = Path(__file__).parents[1] / "assets" / "shakespeare.txt.gz"
CORPUS_CREDIT = "Open Knowledge Foundation, shakespeare package 0.6 (CC BY 2.5); Project Gutenberg texts"


def read_documents(files: Sequence[str] | None = None, text_field: str = "text") -> list[str]:
    """Documents from ``files`` (``.txt``: one document per file; ``.jsonl``: one per line, ``text_field``;
    ``.parquet``: one per row, via ``datasets``; ``.gz`` variants of txt/jsonl), or the bundled works."""
    if not files:
        return split_works(_read_text(BUNDLED_CORPUS))
    documents = []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        suffixes = [s for s in path.suffixes if s != ".gz"]
        kind = suffixes[-1] if suffixes else ".txt"
        if kind == ".jsonl":
            documents += _jsonl_documents(path, text_field)
        elif kind == ".parquet":
            documents += _parquet_documents(path, text_field)
        else:
            documents.append(_read_text(path))
    documents = [d for d in documents if d.strip()]
    if not documents:
        raise ValueError(f"the corpus {', '.join(map(str, files))} holds no text")
    return documents


def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


def _jsonl_documents(path: Path, field: str) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    documents = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if field not in record:
                raise ValueError(f"{path}:{number} has no {field!r} field (set text_field); keys: {sorted(record)}")
            documents.append(str(record[field]))
    return documents


def _parquet_documents(path: Path, field: str) -> list[str]:
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"reading {path} needs the datasets package: pip install datasets") from err
    table = datasets.Dataset.from_parquet(str(path))
    if field not in table.column_names:
        raise ValueError(f"{path} has no {field!r} column (set text_field); columns: {table.column_names}")
    return [str(x) for x in table[field]]


def split_works(text: str) -> list[str]:
    """Split the bundled corpus into its works.

    Each work starts with a title line and, after blank lines, its byline. The file glues a title to the
    previous work's last words ("THE ENDANTONY AND CLEOPATRA", "[Exeunt.]AS YOU LIKE IT"), so the cut
    falls after such an ending; every character lands in exactly one work either way.
    """
    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))
    cuts = []
    for i, line in enumerate(lines):
        if line.startswith("by William Shakespeare"):
            title = i - 1
            while title > 0 and not lines[title].strip():
                title -= 1
            head = lines[title]
            within = 7 if head.startswith("THE END") else head.rfind("]") + 1
            cuts.append(offsets[title] + within)
    cuts = [0, *[c for c in cuts if c > 0], len(text)]
    return [text[a:b] for a, b in itertools.pairwise(cuts) if text[a:b].strip()]


def split_documents(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, validation): every k-th whole document goes to validation (at least one).

    A single document is cut once, at a line break near the end, so the two parts still share no text.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if len(documents) == 1:
        text = documents[0]
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction)))
        cut = cut if cut > 0 else int(len(text) * (1 - val_fraction))
        return [text[:cut]], [text[cut:]]
    n_val = max(1, round(len(documents) * val_fraction))
    step = len(documents) / n_val
    val_idx = {int(step * i + step / 2) for i in range(n_val)}
    train = [d for i, d in enumerate(documents) if i not in val_idx]
    val = [d for i, d in enumerate(documents) if i in val_idx]
    return train, val
