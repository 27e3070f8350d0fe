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
    val_idx = held_out_indices(len(documents), val_fraction)
    train = [d for i, d in enumerate(documents) if i not in val_idx]
    val = [d for i, d in enumerate(documents) if i in val_idx]
    return train, val


def held_out_indices(count: int, val_fraction: float) -> set[int]:
    """The documents of ``count`` that validation holds out: every k-th, at least one."""
    held = max(1, round(count * val_fraction))
    step = count / held
    return {int(step * i + step / 2) for i in range(held)}


def document_splits(files: Sequence[str] | None, text_field: str = "text", val_fraction: float = 0.05):
    """``({"train": Dataset, "val": Dataset}, sources)``: the documents ``read_documents`` reads, as ``datasets``
    tables of one ``text`` column split as ``split_documents`` splits, and each source's path and size in bytes.

    jsonl and parquet files are read into memory-mapped Arrow files (``datasets``' cache), so the documents of a
    large corpus are never all in memory; a text file is one document, read whole.
    """
    import datasets

    if not files:
        train, val = split_documents(split_works(_read_text(BUNDLED_CORPUS)), val_fraction)
        sources = [{"path": "bundled", "bytes": BUNDLED_CORPUS.stat().st_size}]
        return _tables(train, val), sources
    parts, sources = [], []
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"corpus file {path} does not exist")
        sources.append({"path": str(path.resolve()), "bytes": path.stat().st_size})
        parts.append(_file_table(path, text_field))
    documents = datasets.concatenate_datasets(parts).filter(
        lambda batch: [bool(t.strip()) for t in batch["text"]], batched=True, desc="dropping empty documents"
    )
    if not len(documents):
        raise ValueError(f"the corpus {', '.join(map(str, files))} holds no text")
    if len(documents) == 1:  # one document is cut once, near the end
        train, val = split_documents([documents[0]["text"]], val_fraction)
        return _tables(train, val), sources
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    held = held_out_indices(len(documents), val_fraction)
    train = [i for i in range(len(documents)) if i not in held]
    return {"train": documents.select(train), "val": documents.select(sorted(held))}, sources


def _file_table(path: Path, text_field: str):
    """One file's documents as a ``text`` column: a jsonl line or parquet row each, or a text file whole."""
    import datasets

    suffixes = [s for s in path.suffixes if s != ".gz"]
    kind = suffixes[-1] if suffixes else ".txt"
    if kind not in (".jsonl", ".parquet"):
        return datasets.Dataset.from_dict({"text": [_read_text(path)]})
    builder = "json" if kind == ".jsonl" else "parquet"
    table = datasets.load_dataset(builder, data_files=str(path), split="train")
    if text_field not in table.column_names:
        raise ValueError(f"{path} has no {text_field!r} field (set text_field); fields: {table.column_names}")
    table = table.select_columns([text_field])
    return table.rename_column(text_field, "text") if text_field != "text" else table


def _tables(train: list[str], val: list[str]):
    import datasets

    return {"train": datasets.Dataset.from_dict({"text": train}), "val": datasets.Dataset.from_dict({"text": val})}
