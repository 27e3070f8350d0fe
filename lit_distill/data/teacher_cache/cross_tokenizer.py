"""Teacher caches across tokenizers: the vocabulary map the teacher's signal is binned with, and what is stored
beside such a cache.

A data module built with ``teacher_tokenizer=`` (its ``tokenizer`` is the student's) makes ``cache_teacher`` run
the teacher on its own tokenization of the rows and bin its signal into the student's vocabulary
(``CrossTokenizerPass`` in ``signal.py``). This file checks the map against the data's two tokenizers, names it in
the cache's settings (``vocabulary_map_hash``) and stores it with the teacher's tokenizer beside the cache:

    teacher_tokenizer/   the teacher's tokenizer (the student's is in tokenizer/, as in any cache)
    vocab_map.npz        teacher_to_student int64 [Vt] (-1: dropped) and exact bool [Vt]
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..cross_tokenizer.vocab_map import VocabularyMap, build_vocabulary_map
from .manifest import tokenizer_hash
from .signal import TeacherSignal

TEACHER_TOKENIZER_DIR = "teacher_tokenizer"  # a cross-tokenizer cache: the teacher's tokenizer, beside tokenizer/
VOCABULARY_MAP = "vocab_map.npz"  # and the vocabulary map the signal was binned with


def checked_vocabulary_map(data, given: VocabularyMap | None, signals: list[TeacherSignal]) -> VocabularyMap | None:
    """The map a cross-tokenizer cache bins with (None: the teacher reads the data's own ids), checked against
    the data's two tokenizers and the signals' k."""
    teacher_tokenizer = getattr(data, "teacher_tokenizer", None)
    if teacher_tokenizer is None:
        if given is not None:
            raise ValueError(
                "cache_teacher got a vocabulary_map, but the data has no teacher_tokenizer: build the data module"
                " with teacher_tokenizer= (its tokenizer is then the student's) so that the teacher reads its own"
                " tokenization of the rows"
            )
        return None
    if given is None:
        cache_dir = getattr(data, "cache_dir", None)
        given = build_vocabulary_map(teacher_tokenizer, data.tokenizer, cache_dir=cache_dir)
    hashes = tokenizer_hash(teacher_tokenizer), tokenizer_hash(data.tokenizer)
    if (given.teacher_hash, given.student_hash) != hashes:
        raise ValueError(
            f"the vocabulary map maps teacher tokenizer {given.teacher_hash[:12]} to student tokenizer"
            f" {given.student_hash[:12]}, the data's tokenizers are teacher {tokenizer_name(teacher_tokenizer)}"
            f" ({hashes[0][:12]}) and student {tokenizer_name(data.tokenizer)} ({hashes[1][:12]}): build the map"
            " from these"
        )
    for signal in signals:
        if signal.slots > given.student_vocab_size:
            raise ValueError(f"k={signal.slots} slots are more than the student's {given.student_vocab_size} tokens")
    return given


def tokenizer_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def tokenizer_names(data, vocabulary_map: VocabularyMap | None) -> dict[str, str]:
    """The manifest's names of the two tokenizers of a cross-tokenizer cache (empty for any other)."""
    if vocabulary_map is None:
        return {}
    return {"student": tokenizer_name(data.tokenizer), "teacher": tokenizer_name(data.teacher_tokenizer)}


def cross_tokenizer_settings(vocabulary_map: VocabularyMap | None) -> dict[str, str]:
    """The ``CacheSettings`` fields of a cross-tokenizer cache (empty for any other): what its signal depends on
    besides the teacher and the student's tokenizer."""
    if vocabulary_map is None:
        return {}
    return {
        "teacher_tokenizer_hash": vocabulary_map.teacher_hash,
        "vocabulary_map_hash": vocabulary_map_hash(vocabulary_map),
    }


def save_cross_tokenizer(directory: Path, data, vocabulary_map: VocabularyMap) -> None:
    """The teacher's tokenizer and the map, beside a cross-tokenizer cache in ``directory``."""
    data.teacher_tokenizer.save_pretrained(str(directory / TEACHER_TOKENIZER_DIR))
    save_vocabulary_map(vocabulary_map, directory / VOCABULARY_MAP)


def save_vocabulary_map(vocabulary_map: VocabularyMap, path: Path) -> None:
    """The map beside the cache (``vocab_map.npz``): which teacher id went to which student id."""
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, teacher_to_student=vocabulary_map.teacher_to_student, exact=vocabulary_map.exact)
    os.replace(tmp, path)


def vocabulary_map_hash(vocabulary_map: VocabularyMap) -> str:
    """sha256 of the map's teacher -> student ids (what a cache's signal depends on)."""
    return hashlib.sha256(np.ascontiguousarray(vocabulary_map.teacher_to_student, dtype=np.int64).tobytes()).hexdigest()
