"""Cross-tokenizer distillation, the data side: each token's bytes (``token_bytes.py``), byte-aligned groups
between two tokenizations of the same text (``align.py``), and the vocabulary map between the two tokenizers
(``vocab_map.py``); the collator that turns student rows into cross-tokenizer batches (``collate.py``, with one
row's pairs and chunks in ``spans.py``).

The bytes and the alignment are numpy and plain Python, so that they run in DataLoader workers; the vocabulary
map bins probabilities with torch. Nothing here imports ``modules``, ``callbacks``, ``demo`` or ``cli``.
"""

from .align import Alignment, align, byte_offsets
from .collate import CrossTokenizerCollator
from .token_bytes import added_prefix, byte_lengths, bytes_to_unicode, text_bytes_of, token_bytes
from .vocab_map import VocabularyMap, build_vocabulary_map

__all__ = [
    "Alignment",
    "CrossTokenizerCollator",
    "VocabularyMap",
    "added_prefix",
    "align",
    "build_vocabulary_map",
    "byte_lengths",
    "byte_offsets",
    "bytes_to_unicode",
    "text_bytes_of",
    "token_bytes",
]
